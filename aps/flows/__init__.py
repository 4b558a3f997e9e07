"""Conditional normalizing flows q_phi(x | y) built from normflows layers."""
from .base import ConditionalFlow

__all__ = ["ConditionalFlow"]
