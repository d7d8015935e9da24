"""``DGateConfig``: a gated model's settings as data, the one thing that says how to rebuild it.

Like PEFT's ``PeftConfig``, the config is a typed dataclass that turns into the JSON saved as
``dgate_config.json`` (see docs/hub.md) and back. A :class:`~timm_dgate.GatedModel` is built
from a backbone plus a config, and everything that reads or writes the model's settings goes
through it; the run-time state (thresholds, profiles) lives on the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import HubFormatError
from ..version import __version__
from .boundary import LAYOUTS, Boundary
from .gates import POOLS, gate_head, head_for_hidden
from .losses import GATE_LOSSES
from .scores import EXIT_SCORES

FORMAT = "timm_dgate"
FORMAT_VERSION = 3  # the newest this library reads; 2: MLP gates (``gate_hidden``); 3: any registered gate head
CONFIG_NAME = "dgate_config.json"
_REQUIRED = ("format_version", "architecture", "num_classes", "input_size", "backbone", "gates", "pool", "exit_score")
_GATE_KEYS = ("name", "module", "num_chs", "layout")


@dataclass
class DGateConfig:
    """Everything that rebuilds a gated model except the weights and thresholds.

    ``boundaries`` are the probed places the gates sit (in network order, layouts filled in);
    ``base_model`` names the timm Hub id the backbone's weights come from, if any, and
    ``include_backbone`` whether a saved folder stores the backbone itself (timm's layout).
    ``model_args`` are the ``timm.create_model`` kwargs that rebuild the backbone.
    ``gate_head`` names each gate's registered head (``linear``: the paper's gate; see
    :func:`~timm_dgate.register_gate_head`) and ``gate_head_options`` what builds it (``{"hidden": 128}``);
    ``gate_loss`` and ``gate_distill`` record how :func:`~timm_dgate.fit` trained the gates
    (the weight of the backbone's own predictions in their targets).
    ``pruned`` names the modules whose gates ``GatedModel.prune()`` dropped, so a profile made
    before pruning can be told apart from one for another model.
    """

    architecture: str
    num_classes: int
    input_size: tuple[int, int, int]
    boundaries: tuple[Boundary, ...]
    pool: str = "avg"
    gate_loss: str = "hinge"
    exit_score: str = "margin"
    gate_head: str = "linear"
    gate_head_options: dict[str, Any] = field(default_factory=dict)
    gate_distill: float = 0.0
    base_model: str | None = None
    include_backbone: bool = True
    model_args: dict[str, Any] = field(default_factory=dict)
    pruned: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.input_size = tuple(int(s) for s in self.input_size)
        self.boundaries = tuple(self.boundaries)
        self.pruned = tuple(self.pruned)
        self.model_args = dict(self.model_args or {})
        self.gate_head_options = dict(self.gate_head_options or {})
        if self.base_model is not None and self.base_model.startswith("hf-hub:"):
            self.base_model = self.base_model.removeprefix("hf-hub:")  # timm's spelling; the bare repo id is stored
        self.validate()

    @property
    def written_version(self) -> int:
        """The oldest format that holds this config, so older readers load all they can: 1 for linear gates,
        2 for MLP gates (a version-1 reader would misread them), 3 for any other head."""
        hidden = self._format2_hidden()
        return 3 if hidden is None else 2 if hidden else 1

    def _format2_hidden(self) -> int | None:
        """The ``gate_hidden`` that formats 1 and 2 write this head as, or ``None`` when they cannot hold it."""
        hidden = self.gate_head_options.get("hidden", 0)
        try:
            same = head_for_hidden(hidden) == (self.gate_head, self.gate_head_options)
        except ValueError:
            return None
        return hidden if same else None

    @property
    def num_gates(self) -> int:
        return len(self.boundaries)

    def validate(self) -> None:
        """Every value in range; raises ``ValueError`` naming the field."""
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {self.input_size}")
        for name, value, allowed in (
            ("pool", self.pool, POOLS),
            ("gate_loss", self.gate_loss, GATE_LOSSES),
            ("exit_score", self.exit_score, EXIT_SCORES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        gate_head(self.gate_head).check(self.gate_head_options)
        try:
            json.dumps(self.gate_head_options)
        except TypeError as error:
            raise ValueError(f"gate_head_options must be JSON values (the config file holds them): {error}") from error
        if not 0.0 <= self.gate_distill <= 1.0:
            raise ValueError(f"gate_distill must lie in [0, 1], got {self.gate_distill!r}")
        for b in self.boundaries:
            if b.layout not in LAYOUTS:
                raise ValueError(f"boundary {b.name!r} has layout {b.layout!r}; expected one of {LAYOUTS}")
        if not self.include_backbone and not self.base_model:
            raise ValueError(
                "a gates-only folder must name its backbone: pass base_model='<timm Hub id>' or include_backbone=True"
            )

    def replace(self, **changes: Any) -> DGateConfig:
        """A copy with ``changes`` applied and validated (configs are changed only this way)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``dgate_config.json`` (docs/hub.md), version fields included."""
        from timm import __version__ as timm_version

        return {
            "format": FORMAT,
            "format_version": self.written_version,
            "library_version": __version__,
            "timm_version": timm_version,
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "backbone": {
                "source": "folder" if self.include_backbone else "hub",
                "hub_id": self.base_model,
                "model_args": json.loads(json.dumps(self.model_args)),
            },
            "gates": [_gate_dict(b) for b in self.boundaries],
            **({"pruned_gates": list(self.pruned)} if self.pruned else {}),
            "pool": self.pool,
            "gate_loss": self.gate_loss,
            "gate_distill": self.gate_distill,
            **self._head_dict(),
            "exit_score": self.exit_score,
        }

    def _head_dict(self) -> dict[str, Any]:
        """The head as the written version spells it: ``gate_hidden`` up to 2, name and options from 3."""
        hidden = self._format2_hidden()
        if hidden is not None:
            return {"gate_hidden": hidden}
        return {"gate_head": self.gate_head, "gate_head_options": json.loads(json.dumps(self.gate_head_options))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the config") -> DGateConfig:
        """Read and check a config; unknown keys are ignored (forward compatible), missing or bad ones raise
        :class:`~timm_dgate.HubFormatError` naming ``source`` and the field."""
        version = check_format(data, source, FORMAT, FORMAT_VERSION, "a timm_dgate config", format_optional=True)
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise HubFormatError(f"{source} lacks {', '.join(missing)}")
        backbone, gates = data["backbone"], data["gates"]
        if not isinstance(backbone, Mapping) or backbone.get("source") not in ("folder", "hub"):
            raise HubFormatError(f"{source}: backbone.source must be 'folder' or 'hub'")
        if backbone["source"] == "hub" and not backbone.get("hub_id"):
            raise HubFormatError(f"{source}: a backbone with source 'hub' needs a hub_id")
        if not isinstance(backbone.get("model_args") or {}, Mapping):
            raise HubFormatError(f"{source}: backbone.model_args must be an object")
        if not isinstance(gates, list) or not all(isinstance(g, Mapping) and all(k in g for k in _GATE_KEYS)
                                                  for g in gates):
            raise HubFormatError(f"{source}: gates must be a list of objects with {', '.join(_GATE_KEYS)}")
        try:
            return cls(
                architecture=data["architecture"],
                num_classes=data["num_classes"],
                input_size=tuple(data["input_size"]),
                boundaries=tuple(
                    Boundary(g["name"], g["module"], int(g["num_chs"]), int(g.get("reduction", 0)), g["layout"],
                             part=None if g.get("part") is None else int(g["part"]),
                             realign=bool(g.get("realign", False)))
                    for g in gates
                ),
                pool=data["pool"],
                gate_loss=data.get("gate_loss", "hinge"),
                gate_distill=float(data.get("gate_distill", 0.0)),
                **_read_head(data, version),
                exit_score=data["exit_score"],
                base_model=backbone.get("hub_id"),
                include_backbone=backbone["source"] == "folder",
                model_args=dict(backbone.get("model_args") or {}),
                pruned=tuple(str(m) for m in data.get("pruned_gates") or ()),
                format_version=version,
            )
        except (TypeError, ValueError) as error:
            raise HubFormatError(f"{source}: {error}") from error

    def save_pretrained(self, save_directory: str | Path, **state: Any) -> Path:
        """Write ``dgate_config.json`` into ``save_directory`` (``state``: extra top-level keys, e.g. thresholds)."""
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict() | state)
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> DGateConfig:
        """Read ``dgate_config.json`` from a local folder (Hub repos: :meth:`GatedModel.from_pretrained`)."""
        path = Path(folder) / CONFIG_NAME
        return cls.from_dict(read_json(path, "the gated model's config"), str(path))


def _gate_dict(b: Boundary) -> dict[str, Any]:
    """One gate's entry; ``part`` and ``realign`` only where set, so plain boundaries read as before."""
    entry = {"name": b.name, "module": b.module, "num_chs": b.num_chs, "reduction": b.reduction, "layout": b.layout}
    if b.part is not None:
        entry["part"] = b.part
    if b.realign:
        entry["realign"] = True
    return entry


def _read_head(data: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The ``gate_head`` fields of a config: formats 1 and 2 had only ``gate_hidden`` (0, or absent: linear gates)."""
    if version < 3:
        name, options = head_for_hidden(data.get("gate_hidden", 0))
    else:
        name, options = data.get("gate_head", "linear"), data.get("gate_head_options") or {}
        if not isinstance(name, str) or not isinstance(options, Mapping):
            raise ValueError("gate_head must be a name and gate_head_options an object")
    return {"gate_head": name, "gate_head_options": dict(options)}


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or a :class:`HubFormatError` naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise HubFormatError(f"{what} file {path.name} is missing from {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HubFormatError(f"{path} ({what}) is not valid JSON: {error}") from error


def write_json(path: Path, data: Any) -> None:
    """Indented JSON with a final newline, so a file saved twice is the same bytes (an unchanged push is no diff)."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_format(
    data: Any, source: str, name: str, newest: int, what: str, *, format_optional: bool = False
) -> int:
    """The ``format_version`` of a file in format ``name``; a newer one is refused, as this reader could misread it.

    ``format_optional``: a file with no ``format`` field counts as ``name`` (``dgate_config.json``
    readers never required it).
    """
    if not isinstance(data, Mapping) or data.get("format", name if format_optional else None) != name:
        raise HubFormatError(f"{source} is not {what}")
    version = data.get("format_version")
    if not isinstance(version, int):
        raise HubFormatError(f"{source} has no integer format_version")
    if version > newest:
        raise HubFormatError(
            f"{source} has format version {version}, newer than this timm_dgate ({__version__}) reads "
            f"(up to {newest}); upgrade timm_dgate"
        )
    return version


def config_property(field: str, doc: str) -> property:
    """A read-only model attribute answered by its ``config``, so the config stays the one source of truth."""
    return property(lambda model: getattr(model.config, field), doc=doc)
