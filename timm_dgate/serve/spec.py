"""What a served folder is: how to load it in a replica, and the facts the ingress answers requests with.

A replica loads the model itself (:func:`load_model`, by folder and kind), so only the folder's path
or Hub id crosses processes. The ingress never runs the model: it checks requests against a
:class:`ModelSpec` (input size, profiles, preprocessing), read once when the application is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.contract import RunnableExitModel
from ..core.policy import ExitPolicy
from ..errors import InputError

KINDS = ("gated", "cascade", "exported")
EXPORT_MANIFEST = "manifest.json"  # what timm_dgate.export writes (deploy.runtime.MANIFEST)


@dataclass(frozen=True)
class ModelSpec:
    """A served model's facts: its exits, classes, input, profiles (name -> policy), the policy in force
    and how an image file becomes its input (timm's data config; ``None``: tensors only)."""

    folder: str
    kind: str
    num_gates: int
    num_classes: int
    input_size: tuple[int, int, int]
    profiles: dict[str, ExitPolicy]
    active: ExitPolicy
    label_names: tuple[str, ...] | None = None
    data_config: dict[str, Any] | None = field(default=None, hash=False)

    def describe(self) -> dict[str, Any]:
        """What ``GET /`` answers: enough for a client to build a request."""
        return {
            "folder": self.folder,
            "kind": self.kind,
            "num_gates": self.num_gates,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "profiles": list(self.profiles),
            "active_profile": self.active.profile,
            "images": self.data_config is not None,
        }


def folder_kind(folder: str | Path) -> str:
    """``exported`` (a ``timm_dgate.export`` folder), ``cascade`` or ``gated`` (a local folder or a Hub id)."""
    from ..hub.cascade_folder import is_cascade

    path = Path(folder)
    if path.is_dir() and (path / EXPORT_MANIFEST).is_file():
        return "exported"
    if path.is_dir() and is_cascade(path):
        return "cascade"
    return "gated"


def load_model(folder: str, kind: str) -> RunnableExitModel:
    """The model of ``folder`` as ``kind`` says, ready to run (eval mode)."""
    if kind == "exported":
        from ..deploy.runtime import ExportedGatedModel

        return ExportedGatedModel(folder)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    from ..models.auto import from_pretrained

    return from_pretrained(folder).eval()


def _data_config(model: Any, input_size: tuple[int, int, int]) -> dict[str, Any] | None:
    """timm's eval preprocessing of the model at its input size, mean and std one per channel (as the
    recipe records it); ``None`` for a model without a timm config (an exported folder)."""
    config = getattr(model, "pretrained_cfg", None)
    if not isinstance(config, dict):
        return None
    from timm.data import resolve_data_config

    resolved = resolve_data_config({"input_size": input_size}, pretrained_cfg=config)
    for key in ("mean", "std"):
        values = tuple(resolved[key])
        if len(values) != input_size[0]:
            resolved[key] = (sum(values) / len(values),) * input_size[0]
    return resolved


def spec_of(model: RunnableExitModel, folder: str, kind: str, data_config: dict[str, Any] | None = None) -> ModelSpec:
    """The facts of a loaded ``model``; ``data_config`` (timm's keys: ``input_size``, ``mean``, ``std``,
    ``crop_pct``, ``interpolation``, ...) overrides or supplies the preprocessing of image requests."""
    input_size = tuple(int(v) for v in model.input_size)
    config = _data_config(model, input_size)  # type: ignore[arg-type]
    if data_config is not None:
        config = {**(config or {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}),
                  **data_config, "input_size": input_size}
        missing = [k for k in ("mean", "std") if k not in config]
        if missing:
            raise InputError(f"data_config needs {' and '.join(missing)} (one value per input channel)")
    labels = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return ModelSpec(
        folder=folder,
        kind=kind,
        num_gates=model.num_gates,
        num_classes=model.num_classes,
        input_size=input_size,  # type: ignore[arg-type]
        profiles={name: model.policy_for(name) for name in model.profiles},
        active=model.policy_for(None),
        label_names=tuple(labels) if labels and len(labels) == model.num_classes else None,
        data_config=config,
    )


def plain_spec(spec: ModelSpec) -> ModelSpec:
    """The same model served without its exits: no profiles, every gate closed."""
    closed = ExitPolicy((math.inf,) * spec.num_gates, spec.active.exit_score, None)
    return ModelSpec(spec.folder, spec.kind, spec.num_gates, spec.num_classes, spec.input_size, {}, closed,
                     spec.label_names, spec.data_config)


def located(folder: str | Path) -> str:
    """A local folder as an absolute path (replicas may start elsewhere); a Hub id as it is."""
    path = Path(folder).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{folder} is a file; serve a folder saved by save_pretrained, a cascade or an export")
        return str(path.resolve())
    if str(folder).startswith((".", "/", "~")):
        raise InputError(f"{folder} does not exist")
    return str(folder)


def plain_forward(model: RunnableExitModel) -> Any:
    """The plain model's logits for a batch: the backbone alone where the model has one, else every exit closed."""
    forward = getattr(model, "plain_forward", None)
    if forward is not None:
        return forward
    closed = ExitPolicy.closed(model.num_gates, model.policy.exit_score)
    return lambda x: model(x, profile=closed)


def threads(count: int | None) -> None:
    """Set torch's intra-op threads in a replica (``None``: Ray's default, one per CPU the replica reserves)."""
    if count is not None:
        torch.set_num_threads(count)
