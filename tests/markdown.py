"""Fenced code blocks of the docs, for the tests that run them as written."""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced_blocks(path: Path, language: str) -> list[str]:
    """Bodies of the ```language blocks of a markdown file, in order."""
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]
