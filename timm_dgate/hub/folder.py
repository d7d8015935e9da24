"""Hub I/O: the folder format of docs/hub.md, as files in and out. It never imports the model module.

A folder holds ``dgate_config.json`` (a :class:`~timm_dgate.DGateConfig` plus the thresholds in
force), ``gates.safetensors`` (only the gates' weights), ``profiles.json`` (threshold profiles and
what they were measured at) and a model card. The backbone is either stored beside them in
timm's own layout (``config.json`` + ``model.safetensors``, written by timm's ``save_for_hf``),
so ``timm.create_model("hf-hub:...")`` still loads the plain backbone, or named by a timm Hub
id, like a PEFT adapter names its base.

Reading checks every gate file before a backbone is touched and loads tensors only through
safetensors: a bad folder raises :class:`~timm_dgate.HubFormatError` naming the file and field.
:meth:`timm_dgate.GatedModel.save_pretrained` / ``from_pretrained`` / ``push_to_hub`` are the API.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import timm
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from torch import nn

from ..boundaries.probe import default_input_size
from ..compat import get_model_args, hf_split
from ..core.boundary import model_name
from ..core.config import CONFIG_NAME, FORMAT, DGateConfig, read_json
from ..core.gates import DecisionGate
from ..core.profiles import Profile, decode_thresholds, encode_thresholds
from ..errors import HubFormatError
from ..reports import data_config_summary, profiles_table
from ..version import __version__

GATES_NAME = "gates.safetensors"
PROFILES_NAME = "profiles.json"
CARD_NAME = "README.md"
PLOT_NAME = "tradeoff.png"
BACKBONE_CONFIG_NAME = "config.json"  # timm's own files, as save_for_hf writes them
BACKBONE_WEIGHTS_NAME = "model.safetensors"
# what loading reads from a repo (the model card is not among them): the gates' three, then the backbone's two
LOADED_FILES = (CONFIG_NAME, GATES_NAME, PROFILES_NAME, BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME)
LOSS_NAMES = {"hinge": "hinge-loss (one-vs-all SVM)", "ce": "cross-entropy"}
TAGS = ("timm", "image-classification", "early-exit", "decision-gates")


@dataclass
class SavedGates:
    """What a folder holds apart from the backbone, read and checked: config, gate tensors, profiles, state."""

    folder: Path
    config: DGateConfig
    tensors: dict[str, torch.Tensor]
    profiles: list[Profile]
    thresholds: tuple[float, ...]
    active_profile: str | None


# ---- writing ----------------------------------------------------------------------------------


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

    ``state`` holds the thresholds in force and the active profile (saved beside the config).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if backbone is not None:
        save_for_hf(backbone, str(folder), model_args=config.model_args, safe_serialization=True)
    save_file(gate_tensors, str(folder / GATES_NAME), metadata={"format": "pt"})
    _write_json(folder / PROFILES_NAME, {"profiles": [p.to_dict() for p in profiles]})
    config.save_pretrained(folder, **state)
    if tradeoff_plot is not None:
        shutil.copyfile(tradeoff_plot, folder / PLOT_NAME)
    write_model_card(folder, config, profiles, backbone_gflops, card_repo_id)
    return folder


def push_folder(
    write: Callable[[Path, str], Path],
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    commit_message: str,
    token: str | None,
    create_pr: bool,
) -> Any:
    """Create ``repo_id`` if needed, let ``write(tmp_folder, repo_id)`` fill a folder, commit all of it at once."""
    api = HfApi(token=token, library_name=FORMAT, library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with TemporaryDirectory() as tmp:
        folder = write(Path(tmp), repo_id)
        operations = [  # sub-folders too: a cascade's members
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
        )


def write_model_card(
    folder: Path,
    config: DGateConfig,
    profiles: Sequence[Profile],
    backbone_gflops: float | None,
    repo_id: str | None,
) -> None:
    """README.md with Hub metadata, how to load, the profiles table and the trade-off plot if present."""
    data = ModelCardData(
        library_name=FORMAT,
        tags=list(TAGS),
        pipeline_tag="image-classification",
        base_model=hf_split(config.base_model)[0] if config.base_model else None,
    )
    sections = [
        _card_intro(config, backbone_gflops), _card_usage(config, repo_id), _card_preprocessing(folder, config),
        profiles_table(profiles),
    ]
    if (folder / PLOT_NAME).is_file():
        sections.append(f"## Accuracy vs. cost\n\n![accuracy against GFLOPs per image]({PLOT_NAME})\n")
    backbone_files = (
        f", `{BACKBONE_CONFIG_NAME}` + `{BACKBONE_WEIGHTS_NAME}` (the backbone, timm's layout)"
        if config.include_backbone
        else ""
    )
    sections.append(
        f"## Files\n\n`{CONFIG_NAME}` (gate positions, pooling, input size, backbone), `{GATES_NAME}` "
        f"(gate weights), `{PROFILES_NAME}` (threshold profiles){backbone_files}. "
        f"Format version {config.written_version}, written by timm_dgate {__version__}.\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections)).save(folder / CARD_NAME)


def _card_intro(config: DGateConfig, backbone_gflops: float | None) -> str:
    gates = ", ".join(f"`{b.name}`" for b in config.boundaries)
    source = (
        "stored in this repository in timm's layout"
        if config.include_backbone
        else f"[`{config.base_model}`](https://huggingface.co/{hf_split(config.base_model)[0]}) (not stored here)"
    )
    cost = "" if backbone_gflops is None else f" The plain backbone costs {backbone_gflops:.3f} GFLOPs per image."
    loss = LOSS_NAMES.get(config.gate_loss, config.gate_loss)
    kind = "linear" if config.gate_hidden == 0 else f"one-hidden-layer ({config.gate_hidden} units)"
    if config.gate_distill:
        loss += f", distilled from the backbone's predictions (weight {config.gate_distill:g})"
    return (
        f"# {config.architecture} with decision gates\n\n"
        f"A timm `{config.architecture}` ({config.num_classes} classes, input "
        f"{'x'.join(map(str, config.input_size))}) with decision gates after {gates}: pooled {kind} "
        f"classifiers ({loss}) that let confident samples leave early (exit score "
        f"`{config.exit_score}`). Backbone: {source}.{cost}\n"
    )


def _card_usage(config: DGateConfig, repo_id: str | None) -> str:
    repo = repo_id or "<org>/<name>"
    lines = [
        "## How to load\n",
        "```python",
        "import timm_dgate",
        "",
        f'model = timm_dgate.from_pretrained("{repo}")  # the saved active profile, if any',
        f'model = timm_dgate.from_pretrained("{repo}", profile="<name>")  # a profile from the table',
        "logits = model(images)  # early exit per sample; a drop-in for the timm model",
    ]
    if config.include_backbone:
        plain = f'backbone = timm.create_model("hf-hub:{repo}", pretrained=True)  # plain model'
        lines += ["", "import timm", "", plain]
    lines.append("```\n")
    return "\n".join(lines)


def _card_preprocessing(folder: Path, config: DGateConfig) -> str:
    """How images are prepared for the model: as the stored backbone's ``pretrained_cfg`` says, or the base model's."""
    if config.include_backbone:
        cfg = read_json(folder / BACKBONE_CONFIG_NAME, "the backbone's config").get("pretrained_cfg", {})
        said = (
            f"As the backbone's `pretrained_cfg` in `{BACKBONE_CONFIG_NAME}` says, which timm's "
            f"`resolve_data_config` and `create_transform` follow: {data_config_summary(cfg)}."
        )
    else:
        said = f"As the base model's own `pretrained_cfg` says (`{config.base_model}`)."
    return (
        f"## Preprocessing\n\n{said}\n\n```python\nimport timm\n\n"
        "data_config = timm.data.resolve_data_config(model=model.base_model)\n"
        "transform = timm.data.create_transform(**data_config)  # a PIL image -> the tensor the model takes\n```\n"
    )


# ---- reading ----------------------------------------------------------------------------------


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    need_backbone: bool,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
) -> Path:
    """A local folder as is; a Hub repo as a snapshot of just the files loading needs, at one commit."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, not to the local folder {path}")
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise HubFormatError(f"{name_or_path} is not a folder (nor a Hub repo id)")
    # the backbone's files are absent from gates-only repos, so asking for them costs nothing there
    patterns = list(LOADED_FILES if need_backbone else LOADED_FILES[:3])
    return snapshot(str(name_or_path), patterns, revision, cache_dir, token, local_files_only)


def read_folder(folder: Path) -> SavedGates:
    """Config, gate weights, profiles and the saved thresholds of a folder, each checked against the config."""
    config_path = folder / CONFIG_NAME
    raw = read_json(config_path, "the gated model's config")
    config = DGateConfig.from_dict(raw, str(config_path))
    tensors = read_gate_weights(folder, config)
    profiles = read_profiles(folder, config)
    try:
        thresholds = decode_thresholds(raw.get("thresholds") or ["inf"] * config.num_gates, config.num_gates)
    except ValueError as error:
        raise HubFormatError(f"{config_path}: thresholds: {error}") from error
    active = raw.get("active_profile")
    if active is not None and active not in {p.name for p in profiles}:
        known = ", ".join(p.name for p in profiles) or "none"
        raise HubFormatError(f"{config_path}: active_profile {active!r} is not in {PROFILES_NAME} (it has: {known})")
    return SavedGates(folder, config, tensors, profiles, thresholds, active)


def read_gate_weights(folder: Path, config: DGateConfig) -> dict[str, torch.Tensor]:
    """The gate tensors, through safetensors only, with exactly the keys and shapes the config implies."""
    tensors = _load_safetensors(folder / GATES_NAME, "the gate weights")
    expected = {}
    for k, boundary in enumerate(config.boundaries):
        gate = DecisionGate(boundary.num_chs, config.num_classes, "NC", hidden=config.gate_hidden)
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


def read_profiles(folder: Path, config: DGateConfig) -> list[Profile]:
    """``profiles.json`` as :class:`Profile` objects, one threshold per gate each; unknown fields ignored."""
    path = folder / PROFILES_NAME
    data = read_json(path, "the threshold profiles")
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
        raise HubFormatError(f"{path} is not a list of profiles (expected {{\"profiles\": [...]}})")
    profiles = []
    for i, entry in enumerate(data["profiles"]):
        name = entry.get("name", f"#{i}") if isinstance(entry, dict) else f"#{i}"
        if not isinstance(entry, dict) or not {"name", "thresholds"} <= set(entry):
            raise HubFormatError(f"{path}: profile {name!r} needs a name and thresholds")
        try:
            profiles.append(Profile.from_dict(entry, config.num_gates))
        except (KeyError, TypeError, ValueError) as error:
            raise HubFormatError(f"{path}: profile {name!r}: {error}") from error
    return profiles


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
    _check_safetensors(source / BACKBONE_WEIGHTS_NAME, "the backbone weights")
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


def check_boundaries(found: DGateConfig, saved: DGateConfig, folder: Path) -> None:
    """The probed boundaries of the model must carry the saved gates' channels and layouts."""
    for k, (boundary, want) in enumerate(zip(found.boundaries, saved.boundaries)):
        if (boundary.num_chs, boundary.layout) != (want.num_chs, want.layout):
            raise HubFormatError(
                f"gate {k} in {folder} was saved at {want.name!r} with {want.num_chs} channels "
                f"({want.layout}); this model has {boundary.num_chs} ({boundary.layout}) there"
            )


# ---- small helpers ----------------------------------------------------------------------------


def snapshot(
    repo_id: str,
    patterns: list[str],
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
) -> Path:
    """huggingface_hub's snapshot_download: one commit, the cache when offline, only these files."""
    return Path(
        snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            library_name=FORMAT,
            library_version=__version__,
        )
    )


def _load_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise HubFormatError(f"{what} file {path.name} is missing from {path.parent}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise HubFormatError(
            f"{path} ({what}) is not a valid safetensors file, corrupted or truncated: {error}"
        ) from error


def _check_safetensors(path: Path, what: str) -> None:
    """Parse the header, which also checks the file is as long as it says, without loading tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as error:
        raise HubFormatError(
            f"{path} ({what}) is not a valid safetensors file, corrupted or truncated: {error}"
        ) from error


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def saved_state(thresholds: Sequence[float], active_profile: str | None) -> dict[str, Any]:
    """The run-time state saved beside the config: thresholds in force (``inf`` as a string) and the profile."""
    return {"thresholds": encode_thresholds(thresholds), "active_profile": active_profile}

