"""Everything that talks to the Hugging Face Hub: snapshots of the files loading needs, and one-commit pushes.

Reading and writing a folder happen on local paths (:mod:`.folder`, :mod:`.cascade_folder`); this
module only turns a repo id into such a path, or such a path into a commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download

from ..core.config import FORMAT
from ..errors import HubFormatError, HubUnreachableError
from ..version import __version__
from .names import LOADED_FILES


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
    with reaching_the_hub(repo_id):
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
        with reaching_the_hub(repo_id):
            return api.create_commit(
                repo_id, operations, commit_message=commit_message, revision=revision, create_pr=create_pr
            )


NETWORK_LIBRARIES = ("httpx", "httpx2", "requests", "urllib3")  # what huggingface_hub's clients raise


@contextmanager
def reaching_the_hub(repo_id: str) -> Iterator[None]:
    """A failure to reach the Hub or be let in, whichever HTTP client huggingface_hub uses, as one
    :class:`~timm_dgate.errors.HubUnreachableError` that names the repo and the cause."""
    try:
        yield
    except Exception as error:
        if not (isinstance(error, OSError) or type(error).__module__.split(".")[0] in NETWORK_LIBRARIES):
            raise
        cause = (str(error).splitlines() or [""])[0][:200]
        raise HubUnreachableError(f"could not push to {repo_id!r} ({type(error).__name__}: {cause})") from error
