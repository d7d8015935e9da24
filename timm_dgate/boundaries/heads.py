"""Does the classifier look trained? Gates learn to agree with the head, so a random head makes them useless.

The common way to get one by accident is ``timm.create_model(name, pretrained=True, num_classes=N)``
with N other than the checkpoint's: timm drops the checkpoint's head and initialises a new one.
A freshly initialised head is recognisable: timm's own initialisation leaves the bias at exactly
zero (training never does), and torch's default for ``nn.Linear`` draws weights and bias uniformly
within ``±1/sqrt(fan_in)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.boundary import model_name
from ..errors import UnsupportedModelError


def untrained_head_reason(model: nn.Module) -> str | None:
    """Why ``model``'s classifier looks never trained, or None when it looks trained (or cannot be told)."""
    get_classifier = getattr(model, "get_classifier", None)
    head = get_classifier() if callable(get_classifier) else None
    if not isinstance(head, nn.Linear) or head.bias is None or head.weight.numel() < 64:
        return None
    weight, bias = head.weight.detach().float(), head.bias.detach().float()
    bound = 1 / math.sqrt(weight.shape[1])
    if torch.count_nonzero(bias) == 0:
        looks = "its bias is exactly zero, as timm initialises it"
    elif (
        weight.abs().max() <= bound
        and bias.abs().max() <= bound
        and abs(weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    ):
        looks = "its weights are still torch's default uniform initialisation"
    else:
        return None
    cfg_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    num_classes = getattr(model, "num_classes", None)
    why = (
        f" (timm's pretrained config has {cfg_classes} classes and the model {num_classes}: "
        "create_model(..., num_classes=...) replaced the checkpoint's head with a new one)"
        if cfg_classes and num_classes and cfg_classes != num_classes
        else ""
    )
    return (
        f"the classifier looks untrained: {looks}{why}. Gates learn to agree with the head, so fit "
        "them to a trained one: the checkpoint's own classes, or your fine-tuned weights"
    )


def require_classifier(model: nn.Module) -> int:
    """Gates predict classes, so the model must have a head; checked before any probe runs."""
    num_classes = getattr(model, "num_classes", 0)
    if not num_classes:
        raise UnsupportedModelError(
            model_name(model),
            f"it has no classifier (num_classes={num_classes!r}); create the timm model with num_classes > 0",
        )
    return int(num_classes)
