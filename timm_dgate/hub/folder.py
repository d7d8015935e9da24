"""Hub I/O: the folder format of docs/hub.md, as files in and out. It never imports the model module.

A folder holds ``dgate_config.json`` (a :class:`~timm_dgate.DGateConfig` plus the thresholds in
force), ``gates.safetensors`` (only the gates' weights), ``profiles.json`` (threshold profiles and
what they were measured at) and a model card (:mod:`.card`). The backbone is either stored beside
them in timm's own layout (``config.json`` + ``model.safetensors``, written by timm's
``save_for_hf``), so ``timm.create_model("hf-hub:...")`` still loads the plain backbone, or named
by a timm Hub id, like a PEFT adapter names its base (:mod:`.backbone`).

Reading checks every gate file before a backbone is touched and loads tensors only through
safetensors: a bad folder raises :class:`~timm_dgate.HubFormatError` naming the file and field.
:meth:`timm_dgate.GatedModel.save_pretrained` / ``from_pretrained`` / ``push_to_hub`` are the API.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models import save_for_hf
from torch import nn

from ..core.atomic import write_whole
from ..core.config import CONFIG_NAME, DGateConfig, read_json, write_json
from ..core.gates import DecisionGate
from ..core.profiles import Profile, decode_thresholds, encode_thresholds
from ..errors import HubFormatError
from .card import write_model_card
from .names import GATES_NAME, PLOT_NAME, PROFILES_NAME, is_ours
from .weights import load_weights


@dataclass
class SavedGates:
    """What a folder holds apart from the backbone, read and checked: config, gate tensors, profiles, state."""

    folder: Path
    config: DGateConfig
    tensors: dict[str, torch.Tensor]
    profiles: list[Profile]
    thresholds: tuple[float, ...]
    active_profile: str | None


def write_folder(
    folder: Path,
    config: DGateConfig,
    gate_tensors: dict[str, torch.Tensor],
    profiles: Sequence[Profile],
    state: dict[str, Any],
    *,
    backbone: nn.Module | None = None,
    backbone_gflops: float | None = None,
    tradeoff_plot: str | os.PathLike | None = None,
    card_repo_id: str | None = None,
) -> Path:
    """Write a folder in the format of docs/hub.md; ``backbone`` is stored in timm's layout when given.

    ``state`` holds the thresholds in force and the active profile (saved beside the config). The
    folder is written whole (:func:`writing`): the old one stays as it was if anything fails, and
    no file of an earlier save is left (a gates-only save over a folder with a backbone has none),
    but a ``tradeoff.png`` already there is kept when no ``tradeoff_plot`` is given.
    """
    if tradeoff_plot is None and (folder / PLOT_NAME).is_file():
        tradeoff_plot = folder / PLOT_NAME
    with writing(folder, "a gated model's folder") as new:
        if backbone is not None:
            save_for_hf(backbone, str(new), model_args=config.model_args, safe_serialization=True)
        save_file(gate_tensors, str(new / GATES_NAME), metadata={"format": "pt"})
        write_profiles(new, profiles)
        config.save_pretrained(new, **state)
        if tradeoff_plot is not None:
            shutil.copyfile(tradeoff_plot, new / PLOT_NAME)
        write_model_card(new, config, profiles, backbone_gflops, card_repo_id)
    return folder


def writing(folder: Path, what: str) -> AbstractContextManager[Path]:
    """A temporary folder to write a gated or cascade folder into, swapped in whole on success.

    The target may hold only files of these formats (:func:`~.names.is_ours`); a folder with
    anything else is refused with a :class:`~timm_dgate.HubFormatError` naming it, before writing.
    """
    return write_whole(folder, is_ours, what, HubFormatError)


def read_folder(folder: Path) -> SavedGates:
    """Config, gate weights, profiles and the saved thresholds of a folder, each checked against the config."""
    config_path = folder / CONFIG_NAME
    raw = read_json(config_path, "the gated model's config")
    config = DGateConfig.from_dict(raw, str(config_path))
    tensors = read_gate_weights(folder, config)
    profiles = read_profiles(folder / PROFILES_NAME, config.num_gates, "the threshold profiles")
    thresholds, active = read_saved_state(raw, config_path, profiles, config.num_gates)
    return SavedGates(folder, config, tensors, profiles, thresholds, active)


def read_gate_weights(folder: Path, config: DGateConfig) -> dict[str, torch.Tensor]:
    """The gate tensors, through safetensors only, with exactly the keys and shapes the config implies."""
    tensors = load_weights(folder / GATES_NAME, "the gate weights")
    expected = {}
    for k, boundary in enumerate(config.boundaries):
        gate = DecisionGate(
            boundary.num_chs, config.num_classes, "NC", head=config.gate_head, head_options=config.gate_head_options
        )
        expected |= {f"gates.{k}.{name}": tuple(t.shape) for name, t in gate.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HubFormatError(
            f"{folder / GATES_NAME} does not match {CONFIG_NAME}'s {config.num_gates} gates: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise HubFormatError(
                f"{folder / GATES_NAME}: {key} has shape {tuple(tensors[key].shape)}, the config implies {shape}"
            )
    return tensors


# ---- profiles and run-time state: the same files in a gated folder and a cascade's -------------


def write_profiles(folder: Path, profiles: Sequence[Profile]) -> None:
    """``profiles.json``: every profile, in the order they were added."""
    write_json(folder / PROFILES_NAME, {"profiles": [p.to_dict() for p in profiles]})


def read_profiles(path: Path, num_thresholds: int, what: str, hint: str = "") -> list[Profile]:
    """``profiles.json`` as :class:`Profile` objects with ``num_thresholds`` each; unknown fields ignored.

    ``what`` names the file and ``hint`` ends a bad profile's message, so each folder kind explains itself.
    """
    data = read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
        raise HubFormatError(f"{path} is not a list of profiles (expected {{\"profiles\": [...]}})")
    profiles = []
    for i, entry in enumerate(data["profiles"]):
        name = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        if not isinstance(entry, dict) or not {"name", "thresholds"} <= set(entry):
            raise HubFormatError(f"{path}: profile {name!r} needs a name and thresholds")
        try:
            profiles.append(Profile.from_dict(entry, num_thresholds))
        except (KeyError, TypeError, ValueError) as error:
            raise HubFormatError(f"{path}: profile {name!r}: {error}{hint}") from error
    return profiles


def saved_state(thresholds: Sequence[float], active_profile: str | None) -> dict[str, Any]:
    """The run-time state saved beside the config: thresholds in force (``inf`` as a string) and the profile."""
    return {"thresholds": encode_thresholds(thresholds), "active_profile": active_profile}


def read_saved_state(
    raw: Mapping[str, Any], path: Path, profiles: Sequence[Profile], num_thresholds: int
) -> tuple[tuple[float, ...], str | None]:
    """The thresholds and active profile :func:`saved_state` wrote into ``raw``, checked against the profiles."""
    try:
        thresholds = decode_thresholds(raw.get("thresholds") or ["inf"] * num_thresholds, num_thresholds)
    except ValueError as error:
        raise HubFormatError(f"{path}: thresholds: {error}") from error
    active = raw.get("active_profile")
    if active is not None and active not in {p.name for p in profiles}:
        known = ", ".join(p.name for p in profiles) or "none"
        raise HubFormatError(f"{path}: active_profile {active!r} is not in {PROFILES_NAME} (it has: {known})")
    return thresholds, active
