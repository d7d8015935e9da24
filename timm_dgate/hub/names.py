"""The file names of a gated model's folder (docs/hub.md), in one place for the writers, readers and cards."""

from __future__ import annotations

from ..core.config import CONFIG_NAME

GATES_NAME = "gates.safetensors"
PROFILES_NAME = "profiles.json"
CARD_NAME = "README.md"
PLOT_NAME = "tradeoff.png"
BACKBONE_CONFIG_NAME = "config.json"  # timm's own files, as save_for_hf writes them
BACKBONE_WEIGHTS_NAME = "model.safetensors"
# what loading reads from a repo (the model card is not among them): the gates' three, then the backbone's two
LOADED_FILES = (CONFIG_NAME, GATES_NAME, PROFILES_NAME, BACKBONE_CONFIG_NAME, BACKBONE_WEIGHTS_NAME)
