"""``export``: a gated model as files that keep its exits, for ``timm_dgate.deploy.runtime`` to run (docs/deploy.md).

Why segments: a graph exported from the whole gated forward would bake in one exit pattern, so
the backbone is cut where the gates sit (the cut of ``timm_dgate.deploy.segments``, checked to be the
whole forward) and each piece is exported on its own with a dynamic batch axis. A piece that ends
at a gate also outputs the gate's margins (pooling and one linear layer, negligible next to the
backbone), so the runtime makes one call per segment; the exit decision stays outside the files,
so thresholds and profiles switch without re-exporting. Every written file is run once against
the eager model before ``export`` returns.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import write_whole
from ..core.contract import GatedBackbone
from ..errors import ExportError
from ..version import __version__
from .graphs import graphed_modules
from .quantize import plan_quantization, quantize_segments
from .runtime import LOADERS, MANIFEST, SUFFIXES, Manifest, file_sha256
from .runtime_measure import precision
from .stages import chain_modules

VERIFY_ATOL = 1e-4


def _export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    try:
        torch.onnx.export(module, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},),
                          input_names=["x"], external_data=False, verbose=False)
    except ImportError as error:
        raise ExportError(f"ONNX export needs onnx and onnxscript: pip install 'timm-dgate[onnx]' ({error})") from error


def _export_torch(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch},)), str(path))


WRITERS = {"onnx": _export_onnx, "torch": _export_torch}
_EXPORT_FILE = re.compile(rf"{re.escape(MANIFEST)}|segment_[0-9]+({'|'.join(map(re.escape, SUFFIXES.values()))})")


def _is_export_file(entry: Path) -> bool:
    """A file an earlier export wrote (what a new export may replace): the manifest or a segment file."""
    return entry.is_file() and not entry.is_symlink() and _EXPORT_FILE.fullmatch(entry.name) is not None


def _verify(load: Callable[[Path], Any], path: Path, module: nn.Module, x: torch.Tensor, shown: Path) -> None:
    """Run the written file ``path`` against eager on ``x``; ``shown`` is where it would have gone."""
    try:
        got = load(path)(x)
    except Exception as error:  # the backend cannot load or run it (e.g. a dtype onnxruntime lacks kernels for)
        raise ExportError(f"{shown} could not be run to check it ({type(error).__name__}: {error}); "
                          "nothing was written") from error
    want = module(x)
    want = want if isinstance(want, tuple) else (want,)
    close = [torch.allclose(g.float(), w.float(), rtol=VERIFY_ATOL, atol=VERIFY_ATOL) for g, w in zip(got, want)]
    if len(got) != len(want) or not all(close):
        raise ExportError(
            f"{shown} gives other outputs than the eager model at batch size {len(x)}; nothing was written"
        )


@torch.no_grad()
def export(
    gated: GatedBackbone,
    folder: str | os.PathLike,
    format: str = "onnx",
    *,
    quantize: str | None = None,
    calibration: Iterable | None = None,
    quantize_gates: str | None = None,
) -> Path:
    """Write ``gated`` to ``folder``: one file per segment (the last gives the logits, each other its
    features and its gate's margins) and ``manifest.json``.

    ``format``: ``onnx`` (run with ``timm_dgate.deploy.runtime.OnnxGatedModel``; needs the ``onnx``
    extra) or ``torch`` (``torch.export`` programs, run with ``TorchExportedGatedModel``). The
    thresholds in force, the exit score and every profile go into the manifest. The model must
    be in eval mode (exits only run there) and not compiled; a family whose forward is not a
    chain of its segments (a position embedding added in ``forward``, say) raises
    :class:`~timm_dgate.errors.ExportError`, as does a written file that disagrees with eager.
    A model whose gates are all closed and that has no profile exports with a warning: it would
    never exit early until thresholds are set on the runtime. Returns the manifest's path.

    The folder is written whole: everything goes into a hidden sibling folder, is checked there,
    and replaces ``folder`` only then, so a failed export leaves the previous one as it was. The
    folder may hold only an earlier export's files (manifest and segments); anything else is
    refused with :class:`~timm_dgate.errors.ExportError` before writing (it would be lost).

    ``quantize="int8"`` (ONNX only) replaces every segment by onnxruntime's static int8
    quantization (QDQ, per-channel int8 weights, uint8 activations; ``timm_dgate.deploy.quantize``),
    its ranges calibrated on ``calibration``: validation images, ``(images, labels)`` batches, at
    least 64 (the first 512 are used), never ones the gates were fit on or ``evaluate`` measured.
    ``quantize_gates``: ``"int8"`` (the default) or ``"fp32"`` (the gates' nodes left in float). Exit
    scores move under quantization: the manifest marks the profiles it carries as chosen on the
    float model (``chosen_on``); calibrate the runtime itself for thresholds chosen on int8. Every
    export records its FLOPs per image and the sha256 of its segment files, checked at load.
    """
    if format not in WRITERS:
        raise ValueError(f"unknown export format {format!r}; expected one of {tuple(WRITERS)}")
    if not all(hasattr(gated, name) for name in ("base_model", "gates", "boundaries")):
        raise ExportError(
            f"export takes a GatedModel, not a {type(gated).__name__}; a cascade's members export one by one "
            "(export(cascade.members[i], folder)), and the exits between members stay in Python"
        )
    if gated.training:
        raise ExportError("the gated model is in train mode, where no sample exits: call gated.eval() before export")
    if gated.compiled_segments:
        raise ExportError("export a gated model before compile(): compiled segments cannot be exported")
    if graphed_modules(gated.base_model):
        raise ExportError("export a gated model before cuda_graphs(): graph replays cannot be exported")
    param = next(gated.parameters())
    make = torch.Generator().manual_seed(0)
    example = torch.randn((2, *gated.input_size), generator=make).to(param.device, param.dtype)
    steps, head, pieces = chain_modules(gated, example)
    plan = plan_quantization(gated, format, quantize, calibration, quantize_gates)  # before anything is written
    policy = gated.policy  # read once: the exported thresholds and score are one policy
    if policy.all_closed and not gated.profiles:
        warnings.warn("timm_dgate.export: every gate is closed and there is no profile, so the export never exits "
                      "early until thresholds are set on the runtime (calibrate first)", UserWarning, stacklevel=2)

    costs = gated.costs
    with write_whole(folder, _is_export_file, "an export", ExportError) as new:  # the old export or the new one
        modules: list[nn.Module] = [*steps, head]
        chains = [step.segment for step in steps] + [head]
        files = [f"segment_{k}{SUFFIXES[format]}" for k in range(len(modules))]
        check = torch.randn((3, *gated.input_size), generator=make).to(param.device, param.dtype)  # another batch size
        checks = []  # what reaches each file in eager at another batch size, to run the written files on
        for k, (module, chain, name) in enumerate(zip(modules, chains, files)):
            checks.append(check)
            try:
                WRITERS[format](module, example, new / name)
            except ExportError:
                raise
            except Exception as error:
                raise ExportError(
                    f"cannot export {name} (modules {', '.join(pieces[k])}) as {format}: {error}"
                ) from error
            example, check = chain(example), chain(check)
        manifest = Manifest(
            format=format,
            architecture=gated.config.architecture,
            num_classes=gated.num_classes,
            input_size=tuple(gated.input_size),
            dtype=str(param.dtype).removeprefix("torch."),
            boundaries=[b.module for b in gated.boundaries],
            segments=files,
            segment_modules=pieces,
            exit_score=policy.exit_score,
            thresholds=policy.thresholds,
            profiles=list(gated.profiles.values()),
            active_profile=policy.profile,
            costs={"to_gate": list(costs.to_gate), "gate": list(costs.gate), "backbone": costs.backbone},
            checksums={name: file_sha256(new / name) for name in files},
            chosen_on=dict.fromkeys(gated.profiles, precision(param.dtype)),
            timm_dgate_version=__version__,
        )
        manifest.save(new)
        for module, name, x in zip(modules, files, checks):
            _verify(LOADERS[format], new / name, module, x, Path(folder) / name)
        if plan is not None:  # the float files checked against eager: quantize them
            quantization = quantize_segments(plan, new, files, chains, modules)
            replace(manifest, quantize=plan.kind, quantization=quantization,
                    checksums={name: file_sha256(new / name) for name in files}).save(new)
    return Path(folder) / MANIFEST
