"""The measurement scripts behind docs/benchmarks*.md and docs/architectures.md (never run by the tests).

Shared modules sit here (``common``, ``earlyon_adapter``); scripts sit in ``quality/``,
``speed/`` and ``coverage/``, plus the method comparison's first and last steps
(``backbones.py``, ``report.py``). Run a script as a file from the repository root,
``python benchmarks/quality/compare.py ...``: one line before its own imports puts the
repository root on ``sys.path`` (``sys.path.insert(0, ...parents[n])``), so it imports
``benchmarks.common`` as a package (``python -m benchmarks.quality.compare`` works as well).
benchmarks/README.md is the map.
"""
