"""Conditional normalizing flows q_phi(x | y) built from normflows layers."""
from .base import ConditionalFlow
from .image import ConditionalGlow

__all__ = ["ConditionalFlow", "ConditionalGlow"]
