"""timm_dgate: decision gates that make any trained timm classifier cheaper to run.

The data path is ``wrap -> fit -> calibrate -> forward -> save_pretrained / from_pretrained``
(``cascade([small, big])`` chains models, each head one more exit);
docs/architecture.md maps the modules behind it.
"""

from .cache import FeatureCache, cache_features
from .calibration import ExitTable, calibrate, tradeoff_curve
from .cascades import Cascade, cascade, from_pretrained
from .config import DGateConfig
from .discovery import Boundary, family_of, register_family
from .engine import ExitResult
from .errors import CalibrationError, ChanceAccuracyError, ExportError, HubFormatError, UnsupportedModelError
from .evaluation import EvalReport, evaluate
from .exporting import export
from .flops import GateCosts
from .gates import DecisionGate
from .model import GatedModel, stages, wrap
from .profiles import Profile
from .training import FitReport, fit, survivor_weights
from .version import __version__

__all__ = [
    "Boundary",
    "CalibrationError",
    "Cascade",
    "ChanceAccuracyError",
    "DGateConfig",
    "DecisionGate",
    "EvalReport",
    "ExitResult",
    "ExitTable",
    "ExportError",
    "FeatureCache",
    "FitReport",
    "GateCosts",
    "GatedModel",
    "HubFormatError",
    "Profile",
    "UnsupportedModelError",
    "__version__",
    "cache_features",
    "calibrate",
    "cascade",
    "evaluate",
    "export",
    "family_of",
    "fit",
    "from_pretrained",
    "register_family",
    "stages",
    "survivor_weights",
    "tradeoff_curve",
    "wrap",
]
