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

import hashlib
import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..core.engine import AllExited, ExitResult, ExitRun
from ..core.policy import ExitPolicy, ExitPolicyOwner
from ..core.profiles import Profile, decode_thresholds, encode_thresholds
from ..core.provenance import SeenImages
from ..core.scores import EXIT_SCORES
from ..errors import ExportError
from .runtime_measure import RuntimeMeasures

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SUFFIXES = {"onnx": ".onnx", "torch": ".pt2"}
QUANTIZED = ("int8",)  # what ``quantize`` may say (None: float segments)
_SHA256 = re.compile("[0-9a-f]{64}")

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
    # Fields added after format version 1 (an older reader ignores them; a folder without them still loads):
    costs: dict[str, Any] | None = None  # FLOPs per image (core.costs.GateCosts' fields), counted at export
    checksums: dict[str, str] = field(default_factory=dict)  # segment file -> sha256, checked at load
    quantize: str | None = None  # "int8": onnxruntime's static int8 quantization of every segment
    quantization: dict[str, Any] = field(default_factory=dict)  # how (gates int8 or fp32, calibration images, ...)
    chosen_on: dict[str, str] = field(default_factory=dict)  # profile -> precision its thresholds were chosen on
    timm_dgate_version: str = ""
    format_version: int = FORMAT_VERSION

    def save(self, folder: Path, name: str = MANIFEST) -> Path:
        data = asdict(self)
        data["thresholds"] = encode_thresholds(self.thresholds)
        data["profiles"] = [p.to_dict() for p in self.profiles]
        path = folder / name
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
            ("costs", self.costs is None or _valid_costs(self.costs, len(self.boundaries)),
             "null or FLOPs per image: to_gate and gate (one number per gate) and backbone"),
            ("checksums", _str_map(self.checksums) and all(map(_SHA256.fullmatch, self.checksums.values())),
             "a map of segment files to sha256 hex digests"),
            ("quantize", self.quantize is None or (self.quantize in QUANTIZED and self.format == "onnx"),
             f"null or, for an ONNX export, one of {QUANTIZED}"),
            ("quantization", isinstance(self.quantization, dict)
             and (self.quantize is None or self.quantization.get("gates") in ("int8", "fp32")),
             "a map whose gates is 'int8' or 'fp32' for a quantized export"),
            ("chosen_on", _str_map(self.chosen_on), "a map of profile names to precisions"),
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
        if (self.checksums or self.quantize) and sorted(self.checksums) != sorted(self.segments):
            carries = "; a quantized export carries them" if self.quantize else ""
            raise ExportError(f"{path}: checksums must give the sha256 of every segment file "
                              f"({', '.join(self.segments)}){carries}")
        for name, digest in self.checksums.items():
            if file_sha256(folder / name) != digest:
                raise ExportError(f"{folder / name} does not match its sha256 in {path}: the file changed after "
                                  "export (damaged, or replaced); export again")
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ExportError(f"{path}: profiles has a name twice: {names}")
        if self.active_profile is not None and self.active_profile not in names:
            raise ExportError(f"{path}: active_profile {self.active_profile!r} is not among its profiles {names}")


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _str_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _valid_costs(costs: object, num_gates: int) -> bool:
    def numbers(values: object) -> bool:
        return (isinstance(values, list) and len(values) == num_gates
                and all(isinstance(v, (int, float)) for v in values))

    return (isinstance(costs, dict) and numbers(costs.get("to_gate")) and numbers(costs.get("gate"))
            and isinstance(costs.get("backbone"), (int, float)) and costs["backbone"] > 0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


class ExportedGatedModel(RuntimeMeasures, ExitPolicyOwner):
    """Early exit over a folder written by ``timm_dgate.export``, with the exits and logits of the eager model.

    ``model(x)`` gives logits ``(B, num_classes)`` in input order; ``model(x, return_exits=True)``
    an :class:`~timm_dgate.ExitResult` (per sample the gate it left at, ``num_gates`` for the
    head). Thresholds and profiles switch at run time as on a ``GatedModel``. ``providers``:
    onnxruntime execution providers (default: the CPU). ``format``: the folder's format must be
    this one (``None``: either). ``calibrate`` and ``evaluate`` take it as they take a
    ``GatedModel``, on its own exit scores (``deploy.runtime_measure``); :meth:`save_profiles`
    writes what they stored back into the folder.
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
        self.seen_images = SeenImages()  # what evaluate measured this runtime on, refused for calibrating it
        self.chosen_on = dict(self.manifest.chosen_on)
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
        x = self.check_input(x)
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

    def save_profiles(self) -> Path:
        """Write the stored profiles, the policy in force and where each profile was chosen (``chosen_on``) into the
        folder's ``manifest.json``, replacing it in one rename; the segment files stay as they are."""
        policy, profiles = self.policy_to_save()
        manifest = replace(self.manifest, thresholds=policy.thresholds, exit_score=policy.exit_score,
                           profiles=profiles, active_profile=policy.profile,
                           chosen_on={p.name: self.chosen_on.get(p.name, self.precision) for p in profiles})
        temporary = manifest.save(self.folder, f".{MANIFEST}.new")
        try:
            os.replace(temporary, self.folder / MANIFEST)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self.manifest = manifest
        return self.folder / MANIFEST

    def __repr__(self) -> str:
        quantized = f", quantize={self.manifest.quantize!r}" if self.manifest.quantize else ""
        return (f"{type(self).__name__}({str(self.folder)!r}, format={self.manifest.format!r}, "
                f"gates={self.num_gates}{quantized})")


class OnnxGatedModel(ExportedGatedModel):
    """An ONNX export run with onnxruntime (``pip install 'timm-dgate[onnx]'``)."""

    format = "onnx"


class TorchExportedGatedModel(ExportedGatedModel):
    """A ``torch.export`` export (``.pt2`` programs) run with torch alone."""

    format = "torch"

