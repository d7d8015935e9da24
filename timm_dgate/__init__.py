"""timm_dgate: decision gates that make any trained timm classifier cheaper to run.

The data path is ``wrap -> fit -> calibrate -> forward -> save_pretrained / from_pretrained``
(``cascade([small, big])`` chains models, each head one more exit);
docs/architecture.md maps the modules behind it.
"""

from .boundaries.discovery import family_of, register_family
from .boundaries.selection import stages
from .calibration.calibrate import calibrate
from .calibration.curves import tradeoff_curve
from .core.boundary import Boundary
from .core.cache import FeatureCache, cache_features
from .core.config import DGateConfig
from .core.costs import GateCosts
from .core.engine import ExitResult
from .core.exit_table import ExitTable
from .core.gates import DecisionGate, register_gate_head
from .core.policy import ExitPolicy
from .core.profiles import Profile
from .deploy.export import export
from .deploy.refill import predict
from .errors import CalibrationError, ChanceAccuracyError, ExportError, HubFormatError, UnsupportedModelError
from .evaluation.evaluate import evaluate
from .evaluation.results import EvalReport
from .fitting.training import FitReport, fit, survivor_weights
from .models.auto import from_pretrained
from .models.cascade import Cascade, cascade
from .models.gated import GatedModel, wrap
from .version import __version__

__all__ = [
    "Boundary",
    "CalibrationError",
    "Cascade",
    "ChanceAccuracyError",
    "DGateConfig",
    "DecisionGate",
    "EvalReport",
    "ExitPolicy",
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
    "predict",
    "register_family",
    "register_gate_head",
    "stages",
    "survivor_weights",
    "tradeoff_curve",
    "wrap",
]
