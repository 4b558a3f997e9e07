"""aps: amortized posterior sampling with conditional normalizing flows and frozen diffusion priors."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a trained flow checkpoint: `aps.load(path).sample(y, n)` -> (B, n, *event_shape), log_q."""
    from .sampling import load as _load

    return _load(path, device)
