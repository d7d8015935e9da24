"""The backbone a gated folder attaches to: the kwargs that rebuild it, building it with timm, and the
checks that a backbone (built here or passed in) is the one the saved gates were trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..boundaries.probe import default_input_size
from ..compat import get_model_args, hf_split
from ..core.boundary import Boundary, model_name
from ..core.config import DGateConfig
from ..errors import HubFormatError
from .names import BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME
from .remote import snapshot
from .weights import check_weights


def backbone_args(backbone: nn.Module, model_args: dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` kwargs that rebuild ``backbone``: timm's own record plus ``model_args``.

    timm records the kwargs given to ``create_model`` and checks explicit ones against the
    model (``num_classes=5`` on a 10-class model raises); values must be JSON.
    """
    args = get_model_args(backbone, dict(model_args))
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise HubFormatError(
                f"create_model argument {key}={value!r} cannot be saved as JSON; "
                "give a JSON replacement in wrap(..., model_args={...})"
            ) from error
    return json.loads(json.dumps(args))  # tuples -> lists, as they come back


def load_backbone(
    config: DGateConfig,
    folder: Path,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
) -> nn.Module:
    """Build the backbone with timm from a folder in timm's layout: this one, or the base model's snapshot."""
    if config.include_backbone:
        source = folder
    else:
        repo, rev = hf_split(config.base_model)
        patterns = [BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME]
        source = snapshot(repo, patterns, rev, cache_dir, token, local_files_only)
    for name in (BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME):
        if not (source / name).is_file():
            raise HubFormatError(f"the backbone's {name} is missing from {source} (timm_dgate loads only safetensors)")
    check_weights(source / BACKBONE_WEIGHTS_NAME, "the backbone weights")
    try:
        model = timm.create_model(f"local-dir:{source}", pretrained=True, **config.model_args)
    except Exception as error:  # timm's own message, with where it came from
        raise HubFormatError(f"timm could not build the backbone from {source}: {error}") from error
    source_classes = model.pretrained_cfg.get("num_classes")
    if source_classes is not None and source_classes != model.num_classes:  # timm re-initialised the head
        raise HubFormatError(
            f"the backbone in {source} has {source_classes} classes but the gates were saved for a "
            f"{model.num_classes}-class model, so its head would be random; save with include_backbone=True"
        )
    return model.eval()


def check_backbone(model: nn.Module, config: DGateConfig, folder: Path) -> None:
    """The backbone the gates attach to must be the kind they were trained on."""
    where = f"the gates in {folder}"
    if model_name(model) != config.architecture:
        raise HubFormatError(
            f"{where} were saved for architecture {config.architecture!r}; the model is {model_name(model)!r}"
        )
    num_classes = getattr(model, "num_classes", None)
    if num_classes != config.num_classes:
        raise HubFormatError(f"{where} were saved for {config.num_classes} classes; the model has {num_classes}")
    channels = default_input_size(model)[0]
    if channels != config.input_size[0]:
        raise HubFormatError(
            f"{where} were saved for {config.input_size[0]} input channels; the model takes {channels}"
        )


def check_boundaries(found: Sequence[Boundary], saved: DGateConfig, folder: Path) -> None:
    """The probed boundaries of the model must carry the saved gates' channels and layouts."""
    for k, (boundary, want) in enumerate(zip(found, saved.boundaries)):
        if (boundary.num_chs, boundary.layout) != (want.num_chs, want.layout):
            raise HubFormatError(
                f"gate {k} in {folder} was saved at {want.name!r} with {want.num_chs} channels "
                f"({want.layout}); this model has {boundary.num_chs} ({boundary.layout}) there"
            )
