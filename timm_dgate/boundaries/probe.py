"""Check, with one dummy batch, that each boundary really works as an early-exit point.

A boundary passes when its module runs once per forward, emits a batch-first tensor of a
known layout (or a tuple or list holding one), and removing a sample there leaves every
other sample's logits exactly as a plain forward gives them (run through the family's forward
adapter where it has one, as the gated model will be). Anything else is refused when
wrapping, with the reason, rather than failing later inside timm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from ..core.boundary import Boundary, model_name
from ..core.engine import ExitEngine
from ..errors import UnsupportedModelError
from .discovery import family_forward
from .locate import locate_missing

PROBE_BATCH = 3
_CHANNEL_DIM = {"NCHW": 1, "NHWC": 3, "NLC": 2, "NC": 1}


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model expects: its pretrained config, corrected by what it was built with."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    first_conv = cfg.get("first_conv")
    if isinstance(first_conv, str):
        with contextlib.suppress(AttributeError):
            channels = model.get_submodule(first_conv).in_channels
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
        height, width = img_size
    return int(channels), int(height), int(width)


def detect_layout(shape: torch.Size, num_chs: int) -> str | None:
    """Feature layout of a batch-first stage output, or None if it matches no known layout."""
    if len(shape) == 4:
        if shape[1] == num_chs:
            return "NCHW"
        if shape[3] == num_chs:
            return "NHWC"
    if len(shape) == 3 and shape[2] == num_chs:
        return "NLC"
    if len(shape) == 2 and shape[1] == num_chs:
        return "NC"
    return None


@torch.no_grad()
def probe_boundaries(
    model: nn.Module, boundaries: Sequence[Boundary], input_size: Sequence[int], strict: bool = True
) -> list[Boundary]:
    """Verify ``boundaries`` on ``model`` and return them with their layouts (and parts) filled in.

    Entries naming no module are first matched to one by shape (``timm_dgate.boundaries.locate``). A
    boundary where dropping samples breaks the later forward is tried again with the engine
    realigning tensors held from before it. ``strict`` raises :class:`UnsupportedModelError`
    at the first refused boundary; otherwise a refused one comes back with ``problem`` set.
    """
    name = model_name(model)
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.randn((PROBE_BATCH, *input_size), generator=torch.Generator().manual_seed(0))
        x = x.to(param.device, param.dtype)
        try:
            boundaries = locate_missing(model, boundaries, x, input_size)
        except Exception as error:
            raise UnsupportedModelError(
                name, f"a forward pass at input size {tuple(input_size)} failed ({error})"
            ) from error
        refused = [b for b in boundaries if b.problem]  # no module found for it
        if refused and strict:
            raise UnsupportedModelError(name, refused[0].problem, refused[0].name)
        hooked = [b for b in boundaries if not b.problem]
        if not hooked:
            return list(boundaries)
        outputs, reference = _run_recording(model, [b.module for b in hooked], x, name, input_size)
        checked = []
        for boundary, outs in zip(hooked, outputs):
            try:
                boundary = _check_output(name, boundary, outs)
                boundary = _check_exit(model, name, boundary, x, reference)
            except UnsupportedModelError as error:
                if strict:
                    raise
                boundary = replace(boundary, problem=error.reason)
            checked.append(boundary)
        probed = iter(checked)
        return [b if b.problem else next(probed) for b in boundaries]
    finally:
        model.train(was_training)


def _run_recording(
    model: nn.Module, modules: Sequence[str], x: torch.Tensor, name: str, input_size: Sequence[int]
) -> tuple[list[list[object]], torch.Tensor]:
    """One plain forward: every output of each of ``modules``, and the logits."""
    outputs: list[list[object]] = [[] for _ in modules]
    handles = [
        model.get_submodule(m).register_forward_hook(lambda mod, a, out, k=k: outputs[k].append(out))
        for k, m in enumerate(modules)
    ]
    try:
        reference = model(x)
    except Exception as error:
        raise UnsupportedModelError(
            name, f"a forward pass at input size {tuple(input_size)} failed ({error})"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return outputs, reference


def _pick_part(out: tuple | list, num_chs: int) -> tuple[int, str, int] | None:
    """The element a gate reads: the first batch-first tensor with ``num_chs`` channels, else the last
    4-d batch-first one (a multi-resolution list whose channels ``feature_info`` reports after a merge)."""
    tensors = [(i, o) for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.ndim >= 2]
    batch_first = [(i, o) for i, o in tensors if o.shape[0] == PROBE_BATCH]
    for i, o in batch_first:
        layout = detect_layout(o.shape, num_chs)
        if layout is not None:
            return i, layout, num_chs
    spatial = [(i, o) for i, o in batch_first if o.ndim == 4]
    if spatial:
        i, o = spatial[-1]
        return i, "NCHW", int(o.shape[1])
    return None


def _check_output(name: str, boundary: Boundary, outputs: list[object]) -> Boundary:
    if len(outputs) != 1:
        raise UnsupportedModelError(
            name, f"its module runs {len(outputs)} times per forward, not once", boundary.name
        )
    out = outputs[0]
    if isinstance(out, (tuple, list)):
        picked = _pick_part(out, boundary.num_chs)
        if picked is None:
            raise UnsupportedModelError(
                name, f"it outputs a {type(out).__name__} with no batch-first feature tensor", boundary.name
            )
        part, layout, num_chs = picked
        return replace(boundary, part=part, layout=layout, num_chs=num_chs)
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            name, f"it outputs {type(out).__name__}, not a tensor, tuple or list", boundary.name
        )
    if out.shape[0] != PROBE_BATCH:
        raise UnsupportedModelError(
            name, f"its output's first dimension is not the batch (shape {tuple(out.shape)})", boundary.name
        )
    layout = detect_layout(out.shape, boundary.num_chs)
    if layout is None and boundary.layout in _CHANNEL_DIM and out.ndim == len(boundary.layout):
        # a block inside a stage: its stage's layout, its own channels
        return replace(boundary, num_chs=int(out.shape[_CHANNEL_DIM[boundary.layout]]))
    if layout is None:
        raise UnsupportedModelError(
            name,
            f"its output of shape {tuple(out.shape)} has no {boundary.num_chs}-channel layout "
            "(NCHW, NHWC or tokens)",
            boundary.name,
        )
    return replace(boundary, layout=layout)


def _check_exit(model: nn.Module, name: str, boundary: Boundary, x: torch.Tensor, reference: torch.Tensor) -> Boundary:
    """Drop the first sample there; the others must get the plain model's logits. Tried plain, then
    with realigned inputs (which costs a hook on every module, so only where it is needed)."""
    try:
        _drop_first_sample(model, boundary, x, reference, realign=False)
        return boundary
    except UnsupportedModelError as plain_error:
        try:
            _drop_first_sample(model, boundary, x, reference, realign=True)
        except UnsupportedModelError:
            raise plain_error from None
    return replace(boundary, realign=True)


def _drop_first_sample(model: nn.Module, boundary: Boundary, x: torch.Tensor, reference: torch.Tensor,
                       realign: bool) -> None:
    name = model_name(model)

    def drop_first(gate: int, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leave = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        leave[0] = True
        return reference.new_zeros((out.shape[0], reference.shape[1])), leave

    engine = engine_for(model, [replace(boundary, realign=realign)])
    try:
        result = engine.exit_forward(x, drop_first)
    except Exception as error:
        raise UnsupportedModelError(
            name, f"removing samples there breaks the rest of the forward ({error})", boundary.name
        ) from error
    finally:
        engine.remove()
    expected, got = reference[1:], result.logits[1:]
    precision = max(1e-4, 32 * torch.finfo(expected.dtype).eps)  # bf16 kernels may round per batch size
    tolerance = precision * max(1.0, expected.abs().max().item())
    if not torch.allclose(got, expected, rtol=0, atol=tolerance):
        diff = (got - expected).abs().max().item()
        raise UnsupportedModelError(
            name,
            "samples that go on get different logits once others leave there (max difference "
            f"{diff:.3g}); a later layer still sees the full batch, e.g. a shortcut around the boundary",
            boundary.name,
        )


def engine_for(model: nn.Module, boundaries: Sequence[Boundary]) -> ExitEngine:
    """The exit engine for gates at ``boundaries``; every module's input is hooked only where one needs realigning,
    and the family's forward adapter runs where it has one (``timm_dgate.boundaries.adapters``)."""
    return ExitEngine(
        model,
        [b.module for b in boundaries],
        [b.part for b in boundaries],
        realign=any(b.realign for b in boundaries),
        forward=family_forward(model),
    )
