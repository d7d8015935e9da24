"""The one ``from_pretrained``: a cascade or a gated model, by what the folder or Hub repo holds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..hub import cascade_folder as cascade_hub
from ..hub.remote import snapshot
from .cascade import Cascade
from .gated import GatedModel


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    profile: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    **gated_options: Any,
) -> GatedModel | Cascade:
    """Load what ``save_pretrained`` / ``push_to_hub`` wrote: a :class:`Cascade` where the folder or repo has
    a cascade manifest, else a :class:`~timm_dgate.GatedModel` (``gated_options``: its ``model=``).

    Arguments as :meth:`GatedModel.from_pretrained <timm_dgate.GatedModel.from_pretrained>`.
    """
    options = dict(cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    path = Path(name_or_path)
    if path.is_dir():
        if cascade_hub.is_cascade(path):
            if revision is not None:
                raise ValueError(f"revision={revision!r} applies to Hub repos, not to the local folder {path}")
            return Cascade.from_pretrained(path, profile=profile, **options)
    elif not (path.exists() or str(name_or_path).startswith((".", "/", "~"))):
        folder = snapshot(str(name_or_path), cascade_hub.HUB_PATTERNS, revision, **options)
        if cascade_hub.is_cascade(folder):
            return Cascade.from_pretrained(folder, profile=profile, **options)
    return GatedModel.from_pretrained(name_or_path, revision=revision, profile=profile, **options, **gated_options)
