"""Forward adapters for timm families whose own forward keeps the batch size from before a boundary.

CoaT, Twins and the DeepSeek and Qwen3 vision towers read ``B = x.shape[0]`` at the top of their
forward and reshape with it after each stage, so once samples exit at a gate that reshape fails.
Each adapter here is that model's forward (timm 1.0.31) with the one change that every reshape
reads the batch from the tensor it reshapes; the modules called, and so the hooks, are the same.
The exit engine runs the adapter in place of ``model(x)``; a plain call of the model never does.
Should a timm release change one of these forwards, the probe refuses the boundaries at ``wrap``
(survivors' logits differ from ``model(x)``) and tests/test_family_adapters.py fails.
Registered with :func:`~timm_dgate.boundaries.discovery.register_family` on import.
"""

from __future__ import annotations

import torch
from timm.models import checkpoint
from timm.models.coat import insert_cls, remove_cls
from torch import nn

from .discovery import register_family


def coat_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``CoaT.forward`` for classification: four serial stages, then (CoaT, not CoaT-Lite) the parallel blocks."""
    stages: list[tuple[torch.Tensor, tuple[int, int]]] = []
    for i in range(1, 5):
        if stages:  # the previous stage's tokens back to a feature map, at the batch they now have
            tokens, size = stages[-1]
            x = remove_cls(tokens).reshape(tokens.shape[0], *size, -1).permute(0, 3, 1, 2).contiguous()
        embed = getattr(model, f"patch_embed{i}")
        x = insert_cls(embed(x), getattr(model, f"cls_token{i}"))
        size = embed.grid_size
        for block in getattr(model, f"serial_blocks{i}"):
            x = block(x, size=size)
        stages.append((x, size))
    if model.parallel_blocks is None:
        return model.forward_head(model.norm4(x))
    (x1, size1), (x2, size2), (x3, size3), (x4, size4) = stages
    for block in model.parallel_blocks:
        x2, x3, x4 = model.cpe2(x2, size2), model.cpe3(x3, size3), model.cpe4(x4, size4)
        x1, x2, x3, x4 = block(x1, x2, x3, x4, sizes=[size1, size2, size3, size4])
    return model.forward_head([model.norm2(x2), model.norm3(x3), model.norm4(x4)])


def twins_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Twins.forward``: per stage a patch embedding, blocks with the position block after the first."""
    stages = zip(model.patch_embeds, model.pos_drops, model.blocks, model.pos_block)
    for i, (embed, drop, blocks, pos_block) in enumerate(stages):
        x, size = embed(x)
        x = drop(x)
        for j, block in enumerate(blocks):
            x = block(x, size)
            if j == 0:
                x = pos_block(x, size)
        if i < len(model.blocks) - 1:
            x = x.reshape(x.shape[0], *size, -1).permute(0, 3, 1, 2).contiguous()
    return model.forward_head(model.norm(x))


def _vision_tower_forward(model: nn.Module, x: torch.Tensor, norm: str | None, projector: str) -> torch.Tensor:
    """The classifier's (or bare encoder's) forward of a DeepSeek or Qwen3 vision tower; ``norm`` and
    ``projector`` name the encoder's final norm (None: none) and its VLM projector."""
    encoder = getattr(model, "encoder", model)
    x = encoder.patch_embed(x)
    height, width = x.shape[1:3]
    x, rope = encoder._pos_embed(x)
    for block in encoder.blocks:
        x = checkpoint(block, x, rope=rope) if encoder.grad_checkpointing else block(x, rope=rope)
    if norm is not None:
        x = getattr(encoder, norm)(x)
    x = x.reshape(x.shape[0], height, width, -1)
    if getattr(encoder, projector) is not None:
        x = getattr(encoder, projector)(x)
    elif encoder.global_pool == "avg":
        x = x.mean(dim=(1, 2))
    return x if encoder is model else model.forward_head(x)


def deepseek_vit_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``DeepseekVitClassifier.forward``: the encoder's final norm, then its aligner where kept."""
    return _vision_tower_forward(model, x, norm="norm", projector="aligner")


def qwen3_vit_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``Qwen3VitClassifier.forward``: no final encoder norm, then its patch merger where kept."""
    return _vision_tower_forward(model, x, norm=None, projector="merger")


register_family("coat", forward=coat_forward)
register_family("twins", forward=twins_forward)
register_family("deepseek_vit", forward=deepseek_vit_forward)
register_family("qwen3_vit", forward=qwen3_vit_forward)
