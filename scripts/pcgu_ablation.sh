#!/usr/bin/env bash
# One PCGU ablation run: configs/pcgu/NAME.json with --seed SEED, from the repository root, with the fp32
# matmul rate (GFLOP/s, benchmarks/common.py) measured right before and after it in the same process setup.
#   bash scripts/pcgu_ablation.sh NAME [SEED] [extra stage-12 flags...]
# Writes models/pcgu_ablation/NAME-sSEED and outputs/pcgu_ablation/NAME-sSEED/ (summary.json, gflops.json), then
# extra/summary.json: the kept model's overall SS/LMS on 300 held-out examples and CrowS-Pairs (an --eval-only report).
set -euo pipefail
name=$1; seed=${2:-0}; shift; shift || true
code=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-.venv/bin/python}
run=$name-s$seed
log=outputs/pcgu_ablation/$run
mkdir -p "$log"
gflops() { PYTHONPATH="$code/benchmarks" "$python" -c "from common import matmul_gflops; print(round(matmul_gflops(), 1))" | tail -1; }
before=$(gflops)
start=$(date +%s)
PYTHONPATH="$code/src" "$python" "$code/scripts/12_pcgu_unlearn.py" --config "$code/configs/pcgu/$name.json" \
    --seed "$seed" --out "models/pcgu_ablation/$run" --log-dir "$log" \
    --start-cache outputs/pcgu_ablation/start-cache "$@"
end=$(date +%s)
PYTHONPATH="$code/src" "$python" "$code/scripts/12_pcgu_unlearn.py" --config "$code/configs/pcgu/$name.json" \
    --heldout-limit 300 --no-heldout-gender --crows data/crows_pairs/data/crows_pairs_anonymized.csv \
    --completion-tokens 0 --eval-only "models/pcgu_ablation/$run" --log-dir "$log/extra" \
    --start-cache outputs/pcgu_ablation/start-cache --out "models/pcgu_ablation/$run-unused"
after=$(gflops)
printf '{"gflops_before": %s, "gflops_after": %s, "wall_seconds": %s, "threads": "%s"}\n' \
    "$before" "$after" "$((end - start))" "${OMP_NUM_THREADS:-default}" > "$log/gflops.json"
cat "$log/gflops.json"
