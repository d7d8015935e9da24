"""``push_to_hub`` for every model that has ``save_pretrained``: one commit of the whole folder."""

from __future__ import annotations

from typing import Any

from ..hub.remote import push_folder


class PushToHubMixin:
    """Saves with the model's own ``save_pretrained`` into a temporary folder and commits it in one commit."""

    default_commit_message = "Upload with timm_dgate"

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **save_kwargs: Any,
    ) -> Any:
        """Save as in ``save_pretrained`` (``save_kwargs``) and commit the folder to a Hub repo in one commit.

        The repo is created if missing (``private=None``: the Hub's default visibility) and the
        branch ``revision`` too. ``token`` defaults to huggingface_hub's usual sources
        (``HF_TOKEN``, ``hf auth login``). Returns huggingface_hub's ``CommitInfo``.
        """
        return push_folder(
            lambda folder, repo: self.save_pretrained(folder, card_repo_id=repo, **save_kwargs),  # type: ignore[attr-defined]
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message or self.default_commit_message,
            token=token,
            create_pr=create_pr,
        )
