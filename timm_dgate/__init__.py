"""timm_dgate: decision gates that make any trained timm classifier cheaper to run."""

from .discovery import Boundary, UnsupportedModelError, family_of, register_family
from .engine import ExitResult
from .flops import GateCosts
from .gates import DecisionGate
from .hub import HubFormatError, from_pretrained
from .model import GatedModel, stages, wrap
from .profiles import Profile

__version__ = "0.1.0"

__all__ = [
    "Boundary",
    "DecisionGate",
    "ExitResult",
    "GateCosts",
    "GatedModel",
    "HubFormatError",
    "Profile",
    "UnsupportedModelError",
    "__version__",
    "family_of",
    "from_pretrained",
    "register_family",
    "stages",
    "wrap",
]
