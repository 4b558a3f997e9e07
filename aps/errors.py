"""The one exception type that the entry scripts turn into a one-line message and a non-zero exit."""


class ApsError(ValueError):
    """Bad input from the user: a wrong shape, a NaN, a missing or foreign file, a nonsense option."""


def check_finite(name: str, value) -> None:
    """Raise ApsError if a tensor holds NaN or inf."""
    import torch

    if not torch.isfinite(torch.as_tensor(value)).all():
        raise ApsError(f"{name} contains NaN or inf")
