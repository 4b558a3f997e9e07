"""aps: amortized posterior sampling with conditional normalizing flows and frozen diffusion priors."""
__version__ = "0.1.0"


def load(path, device="cpu", prior=None, operator=None):
    """Load a trained flow checkpoint (a folder or a hub id): `aps.load(path).sample(y, n)` -> (B, n, *event_shape), log_q.

    prior / operator, if given, are checked to be the ones the flow was trained for (aps.sampling.load).
    """
    from .sampling import load as _load

    return _load(path, device, prior=prior, operator=operator)


def __getattr__(name):
    """aps.ConditionalFlow (from_pretrained / save_pretrained / push_to_hub), imported on first use: `import aps`
    stays light for the entry scripts."""
    if name == "ConditionalFlow":
        from .flows import ConditionalFlow

        return ConditionalFlow
    raise AttributeError(f"module 'aps' has no attribute {name!r}")
