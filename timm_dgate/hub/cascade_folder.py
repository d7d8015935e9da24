"""A cascade's folder: a manifest, its profiles and model card, and one GatedModel folder per member.

``cascade_config.json`` lists the member folders in run order (``member0``, ``member1``, ...),
the heads' exit score, the thresholds in force and the active profile; ``profiles.json`` holds
the cascade's profiles (one threshold per exit, in run order). Each member folder is the
GatedModel format of docs/hub.md, so its backbone is stored in timm's layout or named by a
timm Hub id, and a plain member is a folder with no gates. Reading checks the manifest and every
profile against the members' configs before any backbone is built. Format in docs/cascades.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.config import CONFIG_NAME, DGateConfig, check_format, read_json, write_json
from ..core.profiles import Profile
from ..core.scores import EXIT_SCORES
from ..errors import HubFormatError
from ..reports import profiles_table
from ..version import __version__
from .card import save_card
from .folder import read_profiles, read_saved_state, write_profiles
from .names import CASCADE_CONFIG_NAME, LOADED_FILES, PROFILES_NAME

CASCADE_FORMAT = "timm_dgate_cascade"
CASCADE_FORMAT_VERSION = 1  # the newest this library reads
# what loading a cascade repo downloads: each member folder's model files, not its card
HUB_PATTERNS = [CASCADE_CONFIG_NAME, PROFILES_NAME, *(f"member*/{name}" for name in LOADED_FILES)]


def member_folder(index: int) -> str:
    return f"member{index}"


@dataclass
class Manifest:
    """A cascade folder's manifest and profiles, checked against the members' configs."""

    members: list[str]
    configs: list[DGateConfig]
    exit_score: str
    profiles: list[Profile]
    thresholds: tuple[float, ...]
    active_profile: str | None


def num_exits(configs: Sequence[DGateConfig]) -> int:
    """Thresholded exits of a cascade of these members: every gate and every head but the last."""
    return sum(c.num_gates + 1 for c in configs) - 1


def write_manifest(
    folder: Path,
    configs: Sequence[DGateConfig],
    exit_score: str,
    profiles: Sequence[Profile],
    state: dict[str, Any],
    card_repo_id: str | None,
) -> Path:
    """Write the manifest, profiles and card beside member folders already written."""
    manifest = {
        "format": CASCADE_FORMAT,
        "format_version": CASCADE_FORMAT_VERSION,
        "library_version": __version__,
        "members": [
            {
                "folder": member_folder(i),
                "architecture": c.architecture,
                "num_gates": c.num_gates,
                "input_size": list(c.input_size),
            }
            for i, c in enumerate(configs)
        ],
        "exit_score": exit_score,
        **state,
    }
    write_json(folder / CASCADE_CONFIG_NAME, manifest)
    write_profiles(folder, profiles)
    _write_card(folder, configs, profiles, card_repo_id)
    return folder


def is_cascade(folder: Path) -> bool:
    return (folder / CASCADE_CONFIG_NAME).is_file()


def read_manifest(folder: Path) -> Manifest:
    """The manifest, the members' configs and the profiles, or a :class:`HubFormatError` naming file and field."""
    path = folder / CASCADE_CONFIG_NAME
    raw = read_json(path, "the cascade's manifest")
    check_format(raw, str(path), CASCADE_FORMAT, CASCADE_FORMAT_VERSION, "a timm_dgate cascade manifest")
    entries = raw.get("members")
    if (
        not isinstance(entries, list)
        or len(entries) < 2
        or not all(isinstance(e, dict) and isinstance(e.get("folder"), str) for e in entries)
    ):
        raise HubFormatError(f"{path}: members must be a list of two or more objects with a folder")
    names = [e["folder"] for e in entries]
    if any("/" in n or "\\" in n or n.startswith(".") for n in names):
        raise HubFormatError(f"{path}: member folders must be plain names inside the cascade folder, got {names}")
    configs = [DGateConfig.from_pretrained(folder / name) for name in names]
    for entry, config in zip(entries, configs):  # what the manifest lists must be what each member holds
        for field, held in (
            ("num_gates", config.num_gates),
            ("architecture", config.architecture),
            ("input_size", list(config.input_size)),
        ):
            if entry.get(field, held) != held:
                raise HubFormatError(
                    f"{path}: member {entry['folder']} is listed with {field} {entry[field]!r}; its "
                    f"{CONFIG_NAME} has {held!r}"
                )
    exits = num_exits(configs)
    score = raw.get("exit_score")
    if score not in EXIT_SCORES:
        raise HubFormatError(f"{path}: exit_score must be one of {EXIT_SCORES}, got {score!r}")
    hint = " (a cascade profile has one threshold per exit)"
    profiles = read_profiles(folder / PROFILES_NAME, exits, "the cascade's threshold profiles", hint)
    thresholds, active = read_saved_state(raw, path, profiles, exits)
    return Manifest(names, configs, score, profiles, thresholds, active)


def _write_card(folder: Path, configs: Sequence[DGateConfig], profiles: Sequence[Profile], repo: str | None) -> None:
    chain = " -> ".join(f"`{c.architecture}`" + (f" ({c.num_gates} gates)" if c.num_gates else "") for c in configs)
    repo = repo or "<org>/<name>"
    usage = (
        "## How to load\n\n```python\nimport timm_dgate\n\n"
        f'model = timm_dgate.from_pretrained("{repo}")  # a Cascade, the saved active profile\n'
        "logits = model(images)  # each sample leaves at the first member confident enough\n```\n"
    )
    members = "\n".join(
        f"- `member{i}/`: {c.architecture}, input {'x'.join(map(str, c.input_size))}, a timm_dgate gated-model "
        f"folder{' with its backbone in timm layout' if c.include_backbone else f' naming `{c.base_model}`'}"
        for i, c in enumerate(configs)
    )
    text = (
        f"# Cascade {chain}\n\nA timm_dgate cascade: each image runs the members cheapest first and leaves at "
        "the first gate or member head confident enough; the last member answers the rest. Each member reads "
        "the batch resized to its own input size.\n\n"
        f"{usage}\n{profiles_table(profiles)}\n## Files\n\n`{CASCADE_CONFIG_NAME}` (members, exit score, "
        f"thresholds), `{PROFILES_NAME}` (one threshold per exit, in run order), and\n\n{members}\n\n"
        f"Format version {CASCADE_FORMAT_VERSION}, written by timm_dgate {__version__}.\n"
    )
    save_card(folder, text, "cascade")
