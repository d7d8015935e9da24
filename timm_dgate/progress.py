"""Progress for long loops: a live bar on a terminal, one line per phase anywhere else.

When output goes to a file, a pipe or CI, a bar's redraws become hundreds of lines of log;
there a phase prints one line when it ends (what it did, how many steps, how long).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


class _Quiet:
    """The part of tqdm's API the library uses, printing one line at the end instead of a bar."""

    def __init__(self, iterable: Iterable[T], desc: str):
        self.iterable, self.desc = iterable, desc

    def __iter__(self) -> Iterator[T]:
        start, steps = time.perf_counter(), 0
        for item in self.iterable:
            steps += 1
            yield item
        print(f"{self.desc}: {steps} steps in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)

    def set_postfix(self, *args: object, **kwargs: object) -> None:
        pass


def progress_bar(iterable: Iterable[T], desc: str, *, enabled: bool = True) -> Iterable[T]:
    """``iterable`` with progress shown as fits the output (nothing at all when not ``enabled``)."""
    if not enabled:
        return tqdm(iterable, disable=True)
    if on_terminal():
        return tqdm(iterable, desc=desc, leave=False)
    return _Quiet(iterable, desc)
