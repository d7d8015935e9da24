"""Errors in what a user asked for, and how the command line reports them (a message and exit code 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class InputError(ValueError):
    """The input cannot work as given (a missing folder, a bad checkpoint); the message says what to change."""


def report_errors(parser: argparse.ArgumentParser, call: Callable[[], int]) -> int:
    """Run ``call``; a user error ends the program like an argparse error: one line, exit code 2, no traceback."""
    from .discovery import UnsupportedModelError
    from .hub import HubFormatError

    try:
        return call()
    except (InputError, UnsupportedModelError, HubFormatError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
