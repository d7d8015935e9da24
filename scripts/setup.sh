#!/usr/bin/env bash
# Set up everything timm_dgate needs on a fresh machine: Fashion-MNIST from Debian,
# a virtual environment in .venv with torch, and the package with its dev tools, the ONNX and the serve extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch 2.14.1 / torchvision 0.29.1 are the builds this machine's pip serves from disk.
quiet() { { grep -v "^WARNING: Location" || true; }; }  # pip's notes on absent local mirrors
.venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | quiet
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,onnx,serve]" 2>&1 | quiet
.venv/bin/python -c "import timm_dgate, torch, timm; print(f'timm_dgate {timm_dgate.__version__}, torch {torch.__version__}, timm {timm.__version__}')"
