"""Hub I/O: save, push and load gated models in one documented folder format (docs/hub.md).

A folder holds ``dgate_config.json`` (what to rebuild), ``gates.safetensors`` (only the
gates' weights), ``profiles.json`` (threshold profiles and what they were measured at) and a
model card. The backbone is either stored beside them in timm's own layout (``config.json``
+ ``model.safetensors``, written by timm's ``save_for_hf``), so ``timm.create_model("hf-hub:...")``
still loads the plain backbone, or named by a timm Hub id, like a PEFT adapter names its base.

Loading reads and checks every gate file before it touches a backbone, loads tensors only
through safetensors, and removes its hooks again if attaching fails: a bad folder raises
:class:`HubFormatError` naming the file and the problem, and nothing is left half-loaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import timm
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from timm.models._hub import hf_split
from timm.models._input import get_model_args
from torch import nn

from .discovery import model_name
from .model import GatedModel, wrap
from .probe import default_input_size
from .profiles import Profile

FORMAT = "timm_dgate"
FORMAT_VERSION = 1
CONFIG_NAME = "dgate_config.json"
GATES_NAME = "gates.safetensors"
PROFILES_NAME = "profiles.json"
CARD_NAME = "README.md"
PLOT_NAME = "tradeoff.png"
BACKBONE_CONFIG_NAME = "config.json"  # timm's own files, as save_for_hf writes them
BACKBONE_WEIGHTS_NAME = "model.safetensors"
LOSS_NAMES = {"hinge": "hinge-loss (one-vs-all SVM)", "ce": "cross-entropy"}
TAGS = ("timm", "image-classification", "early-exit", "decision-gates")
REQUIRED_KEYS = (
    "format_version",
    "architecture",
    "num_classes",
    "input_size",
    "backbone",
    "gates",
    "pool",
    "exit_score",
)


class HubFormatError(ValueError):
    """A saved gated model cannot be loaded (or saved) as asked; the message names the file and the problem."""


# ---- saving -------------------------------------------------------------------------------


def save_pretrained(
    model: GatedModel,
    save_directory: str | os.PathLike,
    *,
    base_model: str | None = None,
    include_backbone: bool | None = None,
    tradeoff_plot: str | os.PathLike | None = None,
    card_repo_id: str | None = None,
) -> Path:
    """Write ``model`` to a folder in the format of docs/hub.md and return the folder.

    Args:
        base_model: timm Hub id the backbone's weights come from (``"timm/resnet50.a1_in1k"``,
            optionally ``@revision``). Given alone, the folder is gates-only and names it.
        include_backbone: store the backbone in timm's layout; default: when no ``base_model``.
        tradeoff_plot: an image copied in as ``tradeoff.png`` and shown on the model card.
        card_repo_id: the repo id the card's usage snippet loads (``push_to_hub`` sets it).
    """
    base_model = _strip_source(base_model)
    include = base_model is None if include_backbone is None else include_backbone
    if not include and base_model is None:
        raise HubFormatError(
            "a gates-only folder must name its backbone: pass base_model='<timm Hub id>' or include_backbone=True"
        )
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    model_args = backbone_args(model)
    config = build_config(model, base_model, include, model_args)
    if include:
        save_for_hf(model.base_model, str(folder), model_args=model_args, safe_serialization=True)
    save_file(gate_tensors(model), str(folder / GATES_NAME), metadata={"format": "pt"})  # one key: same bytes each save
    _write_json(folder / PROFILES_NAME, {"profiles": [p.to_dict() for p in model.profiles.values()]})
    _write_json(folder / CONFIG_NAME, config)
    if tradeoff_plot is not None:
        shutil.copyfile(tradeoff_plot, folder / PLOT_NAME)
    write_model_card(folder, config, list(model.profiles.values()), model, card_repo_id)
    return folder


def push_to_hub(
    model: GatedModel,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload gated model with timm_dgate",
    token: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    include_backbone: bool | None = None,
    tradeoff_plot: str | os.PathLike | None = None,
) -> Any:
    """Save ``model`` to a temporary folder and commit every file in it to ``repo_id`` in one commit.

    The repo is created if missing (``private=None``: the Hub's default visibility) and the
    branch ``revision`` too. ``token=None`` uses huggingface_hub's usual sources. Returns
    huggingface_hub's ``CommitInfo``.
    """
    api = HfApi(token=token, library_name=FORMAT, library_version=_library_version())
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with TemporaryDirectory() as tmp:
        folder = save_pretrained(
            model,
            tmp,
            base_model=base_model,
            include_backbone=include_backbone,
            tradeoff_plot=tradeoff_plot,
            card_repo_id=repo_id,
        )
        operations = [
            CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
            for path in sorted(folder.iterdir())
            if path.is_file()
        ]
        return api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
        )


def backbone_args(model: GatedModel) -> dict[str, Any]:
    """The ``create_model`` kwargs that rebuild the backbone: timm's own record plus ``model.model_args``.

    timm records the kwargs given to ``create_model`` and checks explicit ones against the
    model (``num_classes=5`` on a 10-class model raises); values must be JSON.
    """
    args = get_model_args(model.base_model, dict(model.model_args or {}))
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise HubFormatError(
                f"create_model argument {key}={value!r} cannot be saved as JSON; "
                "give a JSON replacement in wrap(..., model_args={...})"
            ) from error
    return json.loads(json.dumps(args))  # tuples -> lists, as they come back


def build_config(model: GatedModel, base_model: str | None, include: bool, model_args: dict[str, Any]) -> dict:
    """``dgate_config.json``: everything needed to rebuild the gated model, keys as in docs/hub.md."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "timm_version": timm.__version__,
        "architecture": model_name(model.base_model),
        "num_classes": model.num_classes,
        "input_size": list(model.input_size),
        "backbone": {
            "source": "folder" if include else "hub",
            "hub_id": base_model,
            "model_args": model_args,
        },
        "gates": [
            {"name": b.name, "module": b.module, "num_chs": b.num_chs, "reduction": b.reduction, "layout": b.layout}
            for b in model.boundaries
        ],
        "pool": model.pool,
        "gate_loss": model.gate_loss,
        "exit_score": model.exit_score,
        "thresholds": [_encode(t) for t in model.thresholds],
        "active_profile": model.active_profile,
    }


def gate_tensors(model: GatedModel) -> dict[str, torch.Tensor]:
    """Only the gates' state dict, keyed as in ``GatedModel.state_dict()`` (``gates.0.fc.weight``...)."""
    return {f"gates.{k}": v.detach().cpu().contiguous() for k, v in model.gates.state_dict().items()}


# ---- model card -----------------------------------------------------------------------------


def write_model_card(
    folder: Path, config: dict, profiles: Sequence[Profile], model: GatedModel, repo_id: str | None
) -> None:
    """README.md with Hub metadata, how to load, the profiles table and the trade-off plot if present."""
    hub_id = config["backbone"]["hub_id"]
    data = ModelCardData(
        library_name=FORMAT,
        tags=list(TAGS),
        pipeline_tag="image-classification",
        base_model=hf_split(hub_id)[0] if hub_id else None,
    )
    sections = [
        _card_intro(config, model),
        _card_usage(config, repo_id),
        profiles_table(profiles),
    ]
    if (folder / PLOT_NAME).is_file():
        sections.append(f"## Accuracy vs. cost\n\n![accuracy against GFLOPs per image]({PLOT_NAME})\n")
    sections.append(
        f"## Files\n\n`{CONFIG_NAME}` (gate positions, pooling, input size, backbone), `{GATES_NAME}` "
        f"(gate weights), `{PROFILES_NAME}` (threshold profiles)"
        + (
            f", `{BACKBONE_CONFIG_NAME}` + `{BACKBONE_WEIGHTS_NAME}` (the backbone, timm's layout)"
            if config["backbone"]["source"] == "folder"
            else ""
        )
        + f". Format version {config['format_version']}, written by timm_dgate {config['library_version']}.\n"
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections)).save(folder / CARD_NAME)


def _card_intro(config: dict, model: GatedModel) -> str:
    gates = ", ".join(f"`{g['name']}`" for g in config["gates"])
    backbone = config["backbone"]
    source = (
        "stored in this repository in timm's layout"
        if backbone["source"] == "folder"
        else f"[`{backbone['hub_id']}`](https://huggingface.co/{hf_split(backbone['hub_id'])[0]}) (not stored here)"
    )
    cost = ""
    if model._costs is not None:  # only when already measured: saving does not run a FLOP count
        cost = f" The plain backbone costs {model._costs.backbone / 1e9:.3f} GFLOPs per image."
    loss = LOSS_NAMES.get(config["gate_loss"], config["gate_loss"])
    return (
        f"# {config['architecture']} with decision gates\n\n"
        f"A timm `{config['architecture']}` ({config['num_classes']} classes, input "
        f"{'x'.join(map(str, config['input_size']))}) with decision gates after {gates}: pooled linear "
        f"{loss} classifiers that let confident samples leave early (exit score "
        f"`{config['exit_score']}`). Backbone: {source}.{cost}\n"
    )


def _card_usage(config: dict, repo_id: str | None) -> str:
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
    if config["backbone"]["source"] == "folder":
        lines += [
            "",
            "import timm",
            "",
            f'backbone = timm.create_model("hf-hub:{repo}", pretrained=True)  # plain model',
        ]
    lines.append("```\n")
    return "\n".join(lines)


def profiles_table(profiles: Sequence[Profile]) -> str:
    """Markdown section listing each profile with what it was measured at (model card, recipe results)."""
    if not profiles:
        return (
            "## Threshold profiles\n\nNone yet: every gate is closed, so the model answers exactly like the "
            "plain backbone until thresholds are calibrated.\n"
        )
    rows = [
        "## Threshold profiles\n",
        "Chosen on the split named, never on test data. GFLOPs are the average per image at that "
        "split's exits; exit fractions are per gate, then the backbone's head.\n",
        "| profile | exit score | thresholds | split | accuracy | plain accuracy | GFLOPs | exit fractions | test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        cells = [
            f"`{p.name}`",
            p.exit_score,
            ", ".join(_fmt(t) for t in p.thresholds),
            p.split,
            _pct(p.val_accuracy),
            _pct(p.val_plain_accuracy),
            "—" if p.val_gflops is None else f"{p.val_gflops:.4g}",
            ", ".join(f"{f:.1%}" for f in p.exit_fractions) or "—",
            ", ".join(f"{k}: {_fmt(v)}" for k, v in p.test.items()) or "—",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


# ---- loading ----------------------------------------------------------------------------


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    model: nn.Module | None = None,
    profile: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> GatedModel:
    """Load a gated model saved by ``save_pretrained``/``push_to_hub``, in eval mode.

    Args:
        name_or_path: a local folder, or a Hub repo id (``"org/resnet101-dgate"``).
        revision: branch, tag or commit of a Hub repo.
        model: an existing timm model to attach the gates to instead of building the backbone;
            it must have the saved architecture, number of classes and input channels.
        profile: the threshold profile to activate; default: the one active when saved.
        cache_dir, token, local_files_only: as in huggingface_hub (``HF_HUB_OFFLINE=1`` reads
            the cache only).

    Raises :class:`HubFormatError` (a missing, corrupted or newer-format file, a backbone that
    does not match) or ``KeyError`` (an unknown profile); the model passed is left untouched.
    """
    hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    folder = resolve_folder(name_or_path, need_backbone=model is None, **hub)
    config = read_config(folder)
    tensors = read_gate_weights(folder, config)
    profiles = read_profiles(folder, config)
    if profile is not None and profile not in {p.name for p in profiles}:
        known = ", ".join(p.name for p in profiles) or "none"
        raise KeyError(f"unknown profile {profile!r} in {folder}; it has: {known}")
    if model is None:
        model = load_backbone(folder, config, **hub)
    check_backbone(model, config, folder)
    return attach(model, config, tensors, profiles, profile, folder)


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
    patterns = [CONFIG_NAME, GATES_NAME, PROFILES_NAME]
    if need_backbone:  # absent from gates-only repos, so asking costs nothing there
        patterns += [BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME]
    return _snapshot(str(name_or_path), patterns, revision, cache_dir, token, local_files_only)


def read_config(folder: Path) -> dict:
    """``dgate_config.json``, checked: our format, a version this library reads, every key present."""
    config = _read_json(folder / CONFIG_NAME, "the gated model's config")
    if not isinstance(config, dict) or config.get("format", FORMAT) != FORMAT:
        raise HubFormatError(f"{folder / CONFIG_NAME} is not a timm_dgate config")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise HubFormatError(f"{folder / CONFIG_NAME} has no integer format_version")
    if version > FORMAT_VERSION:
        raise HubFormatError(
            f"{folder / CONFIG_NAME} has format version {version}, newer than this timm_dgate "
            f"({_library_version()}) reads (up to {FORMAT_VERSION}); upgrade timm_dgate"
        )
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise HubFormatError(f"{folder / CONFIG_NAME} lacks {', '.join(missing)}")
    _check_structure(config, folder / CONFIG_NAME)
    return config


def _check_structure(config: dict, path: Path) -> None:
    """The nested parts later code indexes into, so a hand-edited file fails here with its name."""
    backbone, gates = config["backbone"], config["gates"]
    if not isinstance(backbone, dict) or backbone.get("source") not in ("folder", "hub"):
        raise HubFormatError(f"{path}: backbone.source must be 'folder' or 'hub'")
    if backbone["source"] == "hub" and not backbone.get("hub_id"):
        raise HubFormatError(f"{path}: a backbone with source 'hub' needs a hub_id")
    if not isinstance(backbone.get("model_args", {}), dict):
        raise HubFormatError(f"{path}: backbone.model_args must be an object")
    keys = ("name", "module", "num_chs", "layout")
    if not isinstance(gates, list) or not all(isinstance(g, dict) and all(k in g for k in keys) for g in gates):
        raise HubFormatError(f"{path}: gates must be a list of objects with {', '.join(keys)}")


def read_gate_weights(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The gate tensors, through safetensors only, with exactly the keys and shapes the config implies."""
    tensors = _load_safetensors(folder / GATES_NAME, "the gate weights")
    expected = {}
    for k, gate in enumerate(config["gates"]):
        expected[f"gates.{k}.fc.weight"] = (config["num_classes"], gate["num_chs"])
        expected[f"gates.{k}.fc.bias"] = (config["num_classes"],)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise HubFormatError(
            f"{folder / GATES_NAME} does not match {CONFIG_NAME}'s {len(config['gates'])} gates: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise HubFormatError(
                f"{folder / GATES_NAME}: {key} has shape {tuple(tensors[key].shape)}, the config implies {shape}"
            )
    return tensors


def read_profiles(folder: Path, config: dict) -> list[Profile]:
    """``profiles.json`` as :class:`Profile` objects, one threshold per gate each."""
    data = _read_json(folder / PROFILES_NAME, "the threshold profiles")
    try:
        profiles = [Profile.from_dict(p) for p in data["profiles"]]
    except (KeyError, TypeError, ValueError) as error:
        raise HubFormatError(f"{folder / PROFILES_NAME} is not a list of profiles ({error})") from error
    for p in profiles:
        if len(p.thresholds) != len(config["gates"]):
            raise HubFormatError(
                f"{folder / PROFILES_NAME}: profile {p.name!r} has {len(p.thresholds)} thresholds "
                f"for {len(config['gates'])} gates"
            )
    return profiles


def load_backbone(
    folder: Path,
    config: dict,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
) -> nn.Module:
    """Build the backbone with timm from a folder in timm's layout: this one, or the base model's snapshot."""
    backbone = config["backbone"]
    if backbone["source"] == "folder":
        source = folder
    else:
        repo, rev = hf_split(backbone["hub_id"])
        patterns = [BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME]
        source = _snapshot(repo, patterns, rev, cache_dir, token, local_files_only)
    for name in (BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME):
        if not (source / name).is_file():
            raise HubFormatError(f"the backbone's {name} is missing from {source} (timm_dgate loads only safetensors)")
    _check_safetensors(source / BACKBONE_WEIGHTS_NAME, "the backbone weights")
    try:
        model = timm.create_model(f"local-dir:{source}", pretrained=True, **backbone.get("model_args", {}))
    except Exception as error:  # timm's own message, with where it came from
        raise HubFormatError(f"timm could not build the backbone from {source}: {error}") from error
    source_classes = model.pretrained_cfg.get("num_classes")
    if source_classes is not None and source_classes != model.num_classes:  # timm re-initialised the head
        raise HubFormatError(
            f"the backbone in {source} has {source_classes} classes but the gates were saved for a "
            f"{model.num_classes}-class model, so its head would be random; save with include_backbone=True"
        )
    return model.eval()


def check_backbone(model: nn.Module, config: dict, folder: Path) -> None:
    """The backbone the gates attach to must be the kind they were trained on."""
    where = f"the gates in {folder}"
    if model_name(model) != config["architecture"]:
        raise HubFormatError(
            f"{where} were saved for architecture {config['architecture']!r}; the model is {model_name(model)!r}"
        )
    num_classes = getattr(model, "num_classes", None)
    if num_classes != config["num_classes"]:
        raise HubFormatError(f"{where} were saved for {config['num_classes']} classes; the model has {num_classes}")
    channels = default_input_size(model)[0]
    if channels != config["input_size"][0]:
        raise HubFormatError(
            f"{where} were saved for {config['input_size'][0]} input channels; the model takes {channels}"
        )


def attach(
    model: nn.Module,
    config: dict,
    tensors: dict[str, torch.Tensor],
    profiles: Sequence[Profile],
    profile: str | None,
    folder: Path,
) -> GatedModel:
    """Wrap ``model`` at the saved boundaries and load everything; on any failure the hooks come off again."""
    try:
        gated = wrap(
            model,
            [g["module"] for g in config["gates"]],
            input_size=config["input_size"],
            pool=config["pool"],
            exit_score=config["exit_score"],
            model_args=config["backbone"].get("model_args"),
        )
    except ValueError as error:  # UnsupportedModelError or an unknown boundary
        raise HubFormatError(f"the gates in {folder} cannot be attached to this model: {error}") from error
    try:
        _check_boundaries(gated, config, folder)
        device = next(model.parameters()).device
        gated.gates.to(device)
        gated.gates.load_state_dict({k.removeprefix("gates."): v.to(device) for k, v in tensors.items()})
        gated.gate_loss = config.get("gate_loss", "hinge")
        gated.set_thresholds([float(t) for t in config.get("thresholds") or [math.inf] * gated.num_gates])
        for p in profiles:
            gated.add_profile(p)
        active = profile or config.get("active_profile")
        if active is not None:
            gated.use_profile(active)
    except Exception:
        gated.unwrap()
        raise
    return gated.eval()


def _check_boundaries(gated: GatedModel, config: dict, folder: Path) -> None:
    for k, (boundary, saved) in enumerate(zip(gated.boundaries, config["gates"])):
        found = (boundary.num_chs, boundary.layout)
        if found != (saved["num_chs"], saved["layout"]):
            raise HubFormatError(
                f"gate {k} in {folder} was saved at {saved['name']!r} with {saved['num_chs']} channels "
                f"({saved['layout']}); this model has {found[0]} ({found[1]}) there"
            )


# ---- small helpers ----------------------------------------------------------------------------


def _snapshot(
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
            library_version=_library_version(),
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


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise HubFormatError(f"{what} file {path.name} is missing from {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise HubFormatError(f"{path} ({what}) is not valid JSON: {error}") from error


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _strip_source(hub_id: str | None) -> str | None:
    """Accept ``hf-hub:org/name`` as timm spells it; store the bare repo id."""
    if hub_id is not None and hub_id.startswith("hf-hub:"):
        return hub_id[len("hf-hub:") :]
    return hub_id


def _encode(value: float) -> float | str:
    return str(value) if math.isinf(value) else value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2%}"


def _library_version() -> str:
    from . import __version__

    return __version__
