"""timm_dgate: decision gates that make any trained timm classifier cheaper to run."""

from .cache import FeatureCache, cache_features
from .calibrate import Target, calibrate, tradeoff_curve
from .discovery import Boundary, UnsupportedModelError, family_of, register_family
from .engine import ExitResult
from .evaluate import EvalReport, evaluate
from .fit import FitReport, fit
from .flops import GateCosts
from .gates import DecisionGate
from .hub import HubFormatError, from_pretrained
from .model import GatedModel, stages, wrap
from .profiles import Profile

__version__ = "0.1.0"

__all__ = [
    "Boundary",
    "DecisionGate",
    "EvalReport",
    "ExitResult",
    "FeatureCache",
    "FitReport",
    "GateCosts",
    "GatedModel",
    "HubFormatError",
    "Profile",
    "Target",
    "UnsupportedModelError",
    "__version__",
    "cache_features",
    "calibrate",
    "evaluate",
    "family_of",
    "fit",
    "from_pretrained",
    "register_family",
    "stages",
    "tradeoff_curve",
    "wrap",
]
