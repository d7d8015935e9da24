"""The file names of a gated model's folder (docs/hub.md), in one place for the writers, readers and cards."""

from __future__ import annotations

import re
from pathlib import Path

from ..core.config import CONFIG_NAME

GATES_NAME = "gates.safetensors"
PROFILES_NAME = "profiles.json"
CARD_NAME = "README.md"
PLOT_NAME = "tradeoff.png"
BACKBONE_CONFIG_NAME = "config.json"  # timm's own files, as save_for_hf writes them
BACKBONE_WEIGHTS_NAME = "model.safetensors"
# what loading reads from a repo (the model card is not among them): the gates' three, then the backbone's two
LOADED_FILES = (CONFIG_NAME, GATES_NAME, PROFILES_NAME, BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME)
CASCADE_CONFIG_NAME = "cascade_config.json"  # a cascade's manifest, beside member0/, member1/, ...
_MEMBER = re.compile(r"member[0-9]+")
_WRITTEN = {*LOADED_FILES, CARD_NAME, PLOT_NAME}  # every file a gated folder's writer may leave


def is_ours(entry: Path) -> bool:
    """An entry a gated or cascade folder's save may replace: one of their file names, or a member
    folder holding only a gated folder's files. Anything else in a target folder is the user's."""
    if entry.is_symlink():
        return False
    if entry.is_dir():
        return _MEMBER.fullmatch(entry.name) is not None and all(
            e.name in _WRITTEN and e.is_file() and not e.is_symlink() for e in entry.iterdir()
        )
    return entry.name in _WRITTEN | {CASCADE_CONFIG_NAME}
