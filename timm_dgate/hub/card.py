"""The model card (``README.md``) of a gated model's folder: Hub metadata, how to load, preprocessing,
the profiles table and the trade-off plot, so a repo page says what the gates do and cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..compat import hf_split
from ..core.config import CONFIG_NAME, FORMAT, DGateConfig, read_json
from ..core.gates import describe_head
from ..core.profiles import Profile
from ..reports import data_config_summary, profiles_table
from ..version import __version__
from .names import BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME, CARD_NAME, GATES_NAME, PLOT_NAME, PROFILES_NAME

LOSS_NAMES = {"hinge": "hinge-loss (one-vs-all SVM)", "ce": "cross-entropy"}


def save_card(folder: Path, text: str, kind_tag: str, base_model: str | None = None) -> None:
    """``README.md`` with the Hub metadata every timm_dgate card carries; ``kind_tag`` marks gates or cascade."""
    data = ModelCardData(
        library_name=FORMAT,
        tags=["timm", "image-classification", "early-exit", kind_tag],
        pipeline_tag="image-classification",
        base_model=base_model,
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}").save(folder / CARD_NAME)


def write_model_card(
    folder: Path,
    config: DGateConfig,
    profiles: Sequence[Profile],
    backbone_gflops: float | None,
    repo_id: str | None,
) -> None:
    """README.md with Hub metadata, how to load, the profiles table and the trade-off plot if present."""
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
    base_model = hf_split(config.base_model)[0] if config.base_model else None
    save_card(folder, "\n".join(sections), "decision-gates", base_model)


def _card_intro(config: DGateConfig, backbone_gflops: float | None) -> str:
    gates = ", ".join(f"`{b.name}`" for b in config.boundaries)
    source = (
        "stored in this repository in timm's layout"
        if config.include_backbone
        else f"[`{config.base_model}`](https://huggingface.co/{hf_split(config.base_model)[0]}) (not stored here)"
    )
    cost = "" if backbone_gflops is None else f" The plain backbone costs {backbone_gflops:.3f} GFLOPs per image."
    loss = LOSS_NAMES.get(config.gate_loss, config.gate_loss)
    kind = describe_head(config.gate_head, config.gate_head_options)
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
