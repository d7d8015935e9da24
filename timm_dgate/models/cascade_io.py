"""A cascade's Hub I/O: its manifest and one gated-model folder per member (format in docs/cascades.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.profiles import check_profile_name
from ..hub import cascade_folder as cascade_hub
from ..hub.folder import saved_state, writing
from .gated import GatedModel


class CascadeHubMixin:
    """``save_pretrained`` / ``from_pretrained`` of a Cascade (``cls(members, exit_score)`` builds one)."""

    def save_pretrained(self, save_directory: str | os.PathLike, *, card_repo_id: str | None = None) -> Path:
        """Write the cascade manifest, its profiles and model card, and one member folder each.

        A member folder is a GatedModel folder (docs/hub.md), so ``timm.create_model("local-dir:...")``
        or ``"hf-hub:<repo>/member0"``-style loading of its backbone works as for any gated model;
        a member made with ``base_model`` names its backbone's Hub id instead of storing it.
        The members and the manifest go into one temporary folder that replaces the old one whole,
        so a save that fails at any member leaves the old cascade folder as it was (docs/cascades.md).
        """
        folder = Path(save_directory)
        policy, profiles = self.policy_to_save()  # read once: the saved thresholds and score are one policy
        with writing(folder, "a cascade's folder") as new:
            for i, member in enumerate(self.members):
                member.save_pretrained(new / cascade_hub.member_folder(i))
            cascade_hub.write_manifest(
                new,
                [m.config for m in self.members],
                policy.exit_score,
                profiles,
                saved_state(policy.thresholds, policy.profile),
                card_repo_id,
            )
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, profile: str | None = None, **options: Any) -> Any:
        """Load a cascade from a local folder (Hub repos: :func:`timm_dgate.from_pretrained`), in eval mode.

        ``options`` (``cache_dir``, ``token``, ``local_files_only``) reach members whose backbone
        is named by a Hub id.
        """
        folder = Path(folder)
        manifest = cascade_hub.read_manifest(folder)
        if profile is not None:
            check_profile_name(profile, [p.name for p in manifest.profiles], str(folder))
        members = [GatedModel.from_pretrained(folder / name, **options) for name in manifest.members]
        model = cls(members, manifest.exit_score)
        for p in manifest.profiles:
            model.add_profile(p)
        model.set_thresholds(manifest.thresholds, manifest.exit_score)
        active = profile or manifest.active_profile
        if active is not None:
            model.use_profile(active)
        return model.eval()
