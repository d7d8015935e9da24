#!/usr/bin/env bash
# Set everything up, then run the main job: the Fashion-MNIST demo (see docs/demo.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/timm-dgate demo "$@"
