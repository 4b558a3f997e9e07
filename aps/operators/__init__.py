"""Forward operators behind one interface (aps.operators.base.Operator), buildable by name."""
from .base import OPERATORS, LinearOperator, Operator, build, register
from .blur import Deblur
from .classifier import Classifier, SmallCNN
from .cs import CompressedSensing
from .image import Denoise, ImageOperator, LinearImageOperator
from .inpaint import InpaintBox, InpaintRandom
from .matrix import MatrixOperator
from .resolution import SuperResolution

__all__ = ["OPERATORS", "LinearOperator", "Operator", "build", "register", "MatrixOperator",
           "ImageOperator", "LinearImageOperator", "Denoise", "InpaintBox", "InpaintRandom",
           "SuperResolution", "Deblur", "CompressedSensing", "Classifier", "SmallCNN"]
