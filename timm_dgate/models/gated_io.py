"""A gated model's Hub I/O: ``save_pretrained`` and ``from_pretrained`` over the folder format of docs/hub.md.

A mixin of :class:`~timm_dgate.GatedModel`: the file formats live in ``timm_dgate.hub``; this is
where a model's state meets them (``push_to_hub`` is shared with the cascade in ``models.pushing``).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from ..boundaries.selection import chosen_boundaries
from ..core.policy import ExitPolicy
from ..core.profiles import check_profile_name
from ..errors import HubFormatError
from ..hub.backbone import backbone_args, check_backbone, check_boundaries, load_backbone
from ..hub.folder import read_folder, saved_state, write_folder
from ..hub.remote import resolve_folder


class GatedHubMixin:
    """``save_pretrained`` / ``from_pretrained`` of a GatedModel (``cls(backbone, config)`` builds one)."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        base_model: str | None = None,
        include_backbone: bool | None = None,
        tradeoff_plot: str | os.PathLike | None = None,
        card_repo_id: str | None = None,
    ) -> Path:
        """Write gates, profiles, config and model card (and the backbone in timm's layout) to a folder.

        ``base_model`` (a timm Hub id such as ``"timm/resnet50.a1_in1k"``) makes a gates-only
        folder that names its backbone instead of storing it, unless ``include_backbone=True``.
        Both default to what the config says (a model loaded from a gates-only folder saves as one).
        ``card_repo_id`` is the repo id the model card's usage snippet loads.
        """
        self._check_attached()
        policy, profiles = self.policy_to_save()  # read once: the saved thresholds and score are one policy
        base_model = base_model or self.config.base_model
        if include_backbone is None:
            include_backbone = self.config.include_backbone if base_model == self.config.base_model else not base_model
        try:
            config = self.config.replace(
                base_model=base_model,
                include_backbone=include_backbone,
                exit_score=policy.exit_score,
                model_args=backbone_args(self.base_model, self.config.model_args),
            )
        except HubFormatError:
            raise
        except ValueError as error:
            raise HubFormatError(str(error)) from error
        tensors = {f"gates.{k}": v.detach().cpu().contiguous() for k, v in self.gates.state_dict().items()}
        return write_folder(
            Path(save_directory),
            config,
            tensors,
            profiles,
            saved_state(policy.thresholds, policy.profile),
            backbone=self.base_model if config.include_backbone else None,
            backbone_gflops=None if self._costs is None else self._costs.backbone / 1e9,  # saving runs no FLOP count
            tradeoff_plot=tradeoff_plot,
            card_repo_id=card_repo_id,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        model: nn.Module | None = None,
        profile: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> Any:
        """Load a gated model saved by ``save_pretrained``/``push_to_hub``, in eval mode.

        Args:
            name_or_path: a local folder, or a Hub repo id (``"org/resnet101-dgate"``).
            revision: branch, tag or commit of a Hub repo.
            model: an existing timm model to attach the gates to instead of building the backbone;
                it must have the saved architecture, number of classes and input channels. It is
                put in eval mode.
            profile: the threshold profile to activate; default: the one active when saved.
            cache_dir, token, local_files_only: as in huggingface_hub (``HF_HUB_OFFLINE=1`` reads
                the cache only).

        Raises :class:`~timm_dgate.HubFormatError` (a missing, corrupted or newer-format file, a
        backbone that does not match) or ``KeyError`` (an unknown profile); a model passed in is
        left unhooked when loading fails.
        """
        options = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        folder = resolve_folder(name_or_path, need_backbone=model is None, **options)
        saved = read_folder(folder)
        if profile is not None:
            check_profile_name(profile, [p.name for p in saved.profiles], str(folder))
        if model is None:
            model = load_backbone(saved.config, folder, **options)
        check_backbone(model, saved.config, folder)
        try:
            found = chosen_boundaries(model, [b.module for b in saved.config.boundaries], saved.config.input_size)
            check_boundaries(found, saved.config, folder)
            gated = cls(model, saved.config.replace(boundaries=tuple(replace(b, gflops=None) for b in found)))
        except HubFormatError:
            raise
        except ValueError as error:  # UnsupportedModelError or an unknown boundary
            raise HubFormatError(f"the gates in {folder} cannot be attached to this model: {error}") from error
        try:
            gated.config = saved.config
            device = next(model.parameters()).device
            gated.gates.to(device)
            gated.gates.load_state_dict({k.removeprefix("gates."): v.to(device) for k, v in saved.tensors.items()})
            for p in saved.profiles:
                gated.add_profile(p)
            if profile is not None:
                gated.use_profile(profile)
            else:  # the policy that ran when saved, not the profile re-read
                active = saved.active_profile
                if active is not None:
                    check_profile_name(active, gated.profiles, str(folder))
                gated._policy = ExitPolicy(saved.thresholds, saved.config.exit_score, active)
        except Exception:
            gated.unwrap()
            raise
        return gated.eval()
