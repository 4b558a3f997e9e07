"""aps: amortized posterior sampling with conditional normalizing flows and frozen diffusion priors."""
__version__ = "0.1.0"
