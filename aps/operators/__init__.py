"""Forward operators behind one interface (aps.operators.base.Operator), buildable by name."""
from .base import OPERATORS, LinearOperator, Operator, build, register
from .matrix import MatrixOperator

__all__ = ["OPERATORS", "LinearOperator", "Operator", "build", "register", "MatrixOperator"]
