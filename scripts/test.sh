#!/usr/bin/env bash
# Set everything up, then lint and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check timm_dgate tests recipes benchmarks
.venv/bin/python -m pytest -q "$@"
