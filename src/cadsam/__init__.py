"""cadsam: adapt Segment Anything to a new domain with CAD, the parallel convolutional adapter.

The Python face: :func:`load` a trained model and ``predict``; :func:`train` and
:func:`evaluate` as the commands do; :func:`build_model` and :func:`build_sam` for the modules
themselves, run under a :class:`Runtime`.
"""

# first, before anything loads PyTorch: OpenMP's threads then wait without spinning (cores.py)
from . import cores  # noqa: F401
from .api import Predictor, evaluate, load, train, zero_shot
from .backbones import BACKBONES
from .errors import CadsamError
from .fast.runtime import Runtime
from .methods import METHODS, AdaptedSam, build_model
from .sam import build_sam

__version__ = "0.1.0"
__all__ = [
    "BACKBONES",
    "METHODS",
    "AdaptedSam",
    "CadsamError",
    "Predictor",
    "Runtime",
    "build_model",
    "build_sam",
    "evaluate",
    "load",
    "train",
    "zero_shot",
]
