"""Every exception timm_dgate raises on purpose; the bottom of the import graph, importing nothing of ours.

Each is a ``ValueError`` (the input, not the library, is wrong) whose message says what to change.
"""

from __future__ import annotations


class InputError(ValueError):
    """The input cannot work as given (a missing folder, a bad checkpoint); the message says what to change."""


class UnsupportedModelError(ValueError):
    """A model, or one of its boundaries, cannot carry a decision gate."""

    def __init__(self, model: str, reason: str, boundary: str | None = None):
        where = f"{model}, boundary '{boundary}'" if boundary is not None else model
        super().__init__(f"timm_dgate cannot gate {where}: {reason}")
        self.model, self.boundary, self.reason = model, boundary, reason


class HubFormatError(ValueError):
    """A saved gated model cannot be loaded (or saved) as asked; the message names the file and the problem."""


class CalibrationError(ValueError):
    """A calibration target cannot be met on the validation data; the message names the best reachable value."""


class ChanceAccuracyError(ValueError):
    """The plain model scores about chance on labelled data, so gates calibrated or measured against it mean nothing.

    Raised by ``calibrate`` and ``evaluate`` (and so the recipe and the CLI) unless
    ``allow_chance_accuracy=True``; the message names the usual causes.
    """


class UntrainedHeadWarning(UserWarning):
    """The model's classifier looks freshly initialised: gates fitted to it would learn a random head."""


class ExportError(ValueError):
    """A gated model cannot be exported as asked (its forward is not a chain of its segments, train mode, a
    compiled model, an exported file that disagrees with eager); the message says why and what works instead."""


class HubUnreachableError(ConnectionError):
    """The Hub could not be reached or refused the request (no network, no token, no access); names the repo."""
