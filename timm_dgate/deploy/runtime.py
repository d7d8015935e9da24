"""Early exit over an exported gated model: the deployable side, which never imports ``timm_dgate.models.gated``.

``timm_dgate.export`` writes a folder: one file per segment (the backbone's work before each
exit, which also outputs that gate's margins, and the work after the last exit, which outputs
the logits; batch axis dynamic) and ``manifest.json`` with the exit score, thresholds and
profiles. Exit decisions stay here, outside the files, so thresholds and profiles switch at run
time. The same :class:`~timm_dgate.core.engine.ExitRun` bookkeeping as the eager model removes the
samples that leave and puts the rows back in input order, so an exported model exits where the
eager one does, with one host synchronisation per open gate.

Backends: ``onnx`` (onnxruntime, the ``onnx`` extra) and ``torch`` (``torch.export`` programs,
``.pt2``). Files are loaded once; inputs and outputs are torch tensors.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

from ..core.engine import AllExited, ExitResult, ExitRun
from ..core.policy import ExitPolicy, ExitPolicyOwner
from ..core.profiles import Profile, decode_thresholds, encode_thresholds
from ..core.scores import EXIT_SCORES
from ..errors import ExportError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SUFFIXES = {"onnx": ".onnx", "torch": ".pt2"}

Runner = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # a segment file: its outputs


@dataclass
class Manifest:
    """What an exported folder holds and how to run it (``manifest.json``; thresholds as in profiles)."""

    format: str
    architecture: str
    num_classes: int
    input_size: tuple[int, int, int]
    dtype: str
    boundaries: list[str]
    segments: list[str]  # file names: (features, margins) for each gate, then the logits
    segment_modules: list[list[str]]  # the backbone modules each segment runs, for reading
    exit_score: str = "margin"
    thresholds: tuple[float, ...] = ()
    profiles: list[Profile] = field(default_factory=list)
    active_profile: str | None = None
    timm_dgate_version: str = ""
    format_version: int = FORMAT_VERSION

    def save(self, folder: Path) -> Path:
        data = asdict(self)
        data["thresholds"] = encode_thresholds(self.thresholds)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        path = folder / MANIFEST
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        """Read and check ``manifest.json``; a missing file or field, or a newer format, raises ExportError."""
        path = folder / MANIFEST
        if not path.is_file():
            raise ExportError(f"{folder} has no {MANIFEST}: not a folder written by timm_dgate.export")
        try:
            data = json.loads(path.read_text())
            if data["format_version"] > FORMAT_VERSION:
                raise ExportError(
                    f"{path} has format version {data['format_version']}; this timm_dgate reads up to "
                    f"{FORMAT_VERSION}: upgrade timm_dgate"
                )
            num_gates = len(data["boundaries"])
            manifest = cls(
                **{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k not in ("profiles",)},
                profiles=[Profile.from_dict(p, num_gates) for p in data.get("profiles", [])],
            )
            manifest.thresholds = decode_thresholds(data["thresholds"], num_gates)
            manifest.input_size = tuple(manifest.input_size)  # a list in the file; not a list: refused by _check
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, ExportError):
                raise
            raise ExportError(f"{path} is not a valid manifest ({type(error).__name__}: {error})") from error
        manifest._check(folder, path)
        return manifest

    def _check(self, folder: Path, path: Path) -> None:
        """Every field the runtime relies on, and the segment files against them: an ExportError naming the field."""
        if self.format not in SUFFIXES:
            raise ExportError(f"{path}: unknown format {self.format!r}; expected one of {tuple(SUFFIXES)}")
        for name, ok, want in (
            ("architecture", isinstance(self.architecture, str), "a string"),
            ("num_classes", _positive(self.num_classes), "a positive integer"),
            ("input_size", len(self.input_size) == 3 and all(map(_positive, self.input_size)), "three positive ints"),
            ("dtype", isinstance(getattr(torch, str(self.dtype), None), torch.dtype), "a torch dtype's name"),
            ("boundaries", isinstance(self.boundaries, list) and all(isinstance(b, str) for b in self.boundaries),
             "a list of module names"),
            ("exit_score", self.exit_score in EXIT_SCORES, f"one of {EXIT_SCORES}"),
        ):
            if not ok:
                raise ExportError(f"{path}: {name} must be {want}, got {getattr(self, name)!r}")
        num_gates = len(self.boundaries)
        expected = [f"segment_{k}{SUFFIXES[self.format]}" for k in range(num_gates + 1)]
        if self.segments != expected:  # the names export writes, in run order
            raise ExportError(f"{path}: segments must be {expected} for a {self.format!r} export of {num_gates} "
                              f"gates, got {self.segments!r}")
        if not isinstance(self.segment_modules, list) or len(self.segment_modules) != len(self.segments):
            raise ExportError(f"{path}: segment_modules must list the modules of each of the {len(expected)} segments")
        missing = [f for f in self.segments if not (folder / f).is_file()]
        if missing:
            raise ExportError(f"{folder} lacks {', '.join(missing)}, listed in its {MANIFEST}")
        for name in self.segments:  # a .pt2 program is a zip archive, an ONNX model a protobuf
            if zipfile.is_zipfile(folder / name) != (self.format == "torch"):
                raise ExportError(f"{folder / name} is not a {self.format!r} file, as the format in {path} says")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ExportError(f"{path}: profiles has a name twice: {names}")
        if self.active_profile is not None and self.active_profile not in names:
            raise ExportError(f"{path}: active_profile {self.active_profile!r} is not among its profiles {names}")


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def onnx_runner(path: Path, providers: Sequence[str] | None = None) -> Runner:
    """An onnxruntime session as a function of a tensor (host memory in between)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ExportError("running an ONNX export needs onnxruntime: pip install 'timm-dgate[onnx]'") from error
    options = ort.SessionOptions()
    # Segments run in turn, one session each: a session's idle workers spinning after its run take the
    # cores the next session needs (measured 3x slower at batch 256 on 2 cores). Without spinning,
    # the chain of segments runs as fast as the whole model in one session.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = list(providers or ["CPUExecutionProvider"])
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = session.run(None, {name: x.detach().cpu().contiguous().numpy()})
        return tuple(torch.from_numpy(y).to(x.device) for y in outputs)

    return run


def torch_runner(path: Path, providers: Sequence[str] | None = None) -> Runner:
    """A ``torch.export`` program (``.pt2``) as a function of a tensor."""
    if providers is not None:
        raise ExportError("providers are for ONNX folders; a torch export runs where it was exported")
    program = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = program(x)
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)

    return run


LOADERS: dict[str, Callable[..., Runner]] = {"onnx": onnx_runner, "torch": torch_runner}


class ExportedGatedModel(ExitPolicyOwner):
    """Early exit over a folder written by ``timm_dgate.export``, with the exits and logits of the eager model.

    ``model(x)`` gives logits ``(B, num_classes)`` in input order; ``model(x, return_exits=True)``
    an :class:`~timm_dgate.ExitResult` (per sample the gate it left at, ``num_gates`` for the
    head). Thresholds and profiles switch at run time as on a ``GatedModel``. ``providers``:
    onnxruntime execution providers (default: the CPU). ``format``: the folder's format must be
    this one (``None``: either).
    """

    format: str | None = None
    noun = "export"

    def __init__(
        self, folder: str | os.PathLike, *, providers: Sequence[str] | None = None, profile: str | None = None
    ):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        if self.format is not None and self.manifest.format != self.format:
            raise ExportError(
                f"{self.folder} holds a {self.manifest.format!r} export; {type(self).__name__} runs {self.format!r} "
                "(ExportedGatedModel runs either)"
            )
        load = partial(LOADERS[self.manifest.format], providers=providers)
        self.segments = [load(self.folder / f) for f in self.manifest.segments]
        self.profiles = {p.name: p for p in self.manifest.profiles}
        self.dtype = getattr(torch, self.manifest.dtype)
        self._policy = ExitPolicy(self.manifest.thresholds, self.manifest.exit_score, self.manifest.active_profile)
        if profile is not None:
            self.use_profile(profile)

    @property
    def num_gates(self) -> int:
        return len(self.manifest.boundaries)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.manifest.input_size

    @torch.inference_mode()
    def __call__(
        self, x: torch.Tensor, return_exits: bool = False, profile: str | ExitPolicy | None = None
    ) -> torch.Tensor | ExitResult:
        """Logits with early exits, as ``GatedModel.forward``; ``profile``: a name or policy for this call alone."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f"expected images (B, {', '.join(map(str, self.input_size))}), got {tuple(x.shape)}")
        x = x.to(self.dtype)
        policy = self.policy_for(profile)  # read once: a switch mid-call does not mix
        run = ExitRun(x.shape[0], x.device)
        try:
            for k, segment in enumerate(self.segments[:-1]):
                x, margins = segment(x)
                if policy.thresholds[k] != math.inf:
                    staying = run.leave(k, x, margins, policy.leaves(k, margins))
                    x = x if staying is None else staying
            (head,) = self.segments[-1](x)
        except AllExited:
            head = None
        result = run.finish(head, self.num_gates)
        return result if return_exits else result.logits

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r}, format={self.manifest.format!r}, gates={self.num_gates})"


class OnnxGatedModel(ExportedGatedModel):
    """An ONNX export run with onnxruntime (``pip install 'timm-dgate[onnx]'``)."""

    format = "onnx"


class TorchExportedGatedModel(ExportedGatedModel):
    """A ``torch.export`` export (``.pt2`` programs) run with torch alone."""

    format = "torch"

