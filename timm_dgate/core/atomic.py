"""Writing a folder as a whole: the target is the old folder or the new one, never a mix of the two.

:func:`write_whole` hands out a temporary sibling of the target (same parent, hidden name), into
which everything is written; when that succeeds the old target is renamed aside, the new folder
renamed into its place, and the old one removed. Any exception while writing removes the temporary
folder and leaves the old target untouched, byte for byte.

Files that are not ours are never deleted. The swap replaces a folder that is missing, empty, or
holds nothing but entries of the format being written (``ours`` says which names those are: a
gated folder's files, a cascade's manifest and member folders, an export's manifest and segments);
a folder that holds anything else (a user's own files, the recipe's other outputs, ``.``) is refused
before anything is written, with an error naming the foreign entries. Between the two renames the
target is briefly absent; a crash exactly there leaves the old folder whole under its hidden
``.<name>.old-*`` sibling.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def foreign_entries(folder: Path, ours: Callable[[Path], bool]) -> list[str]:
    """The names in ``folder`` that ``ours`` does not claim (none when the folder is missing)."""
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if not ours(entry))


@contextmanager
def write_whole(
    folder: str | os.PathLike, ours: Callable[[Path], bool], what: str, error: type[Exception]
) -> Iterator[Path]:
    """Yield an empty temporary folder to write ``folder``'s new contents into; swap it in on success.

    ``ours`` claims an existing entry of the target as one of this format's (so it may be replaced);
    any other entry makes this raise ``error`` naming it and ``what`` is being written, before the
    body runs. A target that exists and is not a folder is refused the same way.
    """
    target = Path(os.path.realpath(folder))  # a symlinked folder is replaced where it points
    if target.exists() and not target.is_dir():
        raise error(f"cannot write {what} to {folder}: it exists and is not a folder")
    cwd = Path.cwd().resolve()
    if target.is_dir() and (cwd == target or target in cwd.parents):
        raise error(f"cannot write {what} to {folder}: it is the working directory (or holds it), which a whole-folder "
                    "swap would remove from under this process; save into a sub-folder")
    foreign = foreign_entries(target, ours)
    if foreign:
        raise error(
            f"cannot write {what} to {folder}: it holds files that are not part of {what} ({', '.join(foreign)}); "
            "the folder is replaced as a whole, so save into a new or empty folder (nothing was written)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(target, "new")
    temporary.mkdir()  # the mode a folder made by mkdir gets, umask applied
    try:
        yield temporary
        _swap(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _swap(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``, moving an old ``target`` aside first and removing it after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = _sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the old folder back before the caller removes the new one
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A hidden, unused name beside ``target``: ``.<name>.<kind>-<random>``."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path
