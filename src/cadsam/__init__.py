"""cadsam: adapt Segment Anything to a new domain with CAD, the parallel convolutional adapter."""

from .methods import METHODS, AdaptedSam, build_model
from .sam import build_sam

__version__ = "0.1.0"
__all__ = ["METHODS", "AdaptedSam", "build_model", "build_sam"]
