#!/usr/bin/env bash
# The GPU check, at most about 8 minutes on one GPU; everything goes to one folder
# (outputs/gpu-check, or the first argument):
#   tests       the exactness and encoder-count tests, in-process on CUDA (GRAM_DEVICE=cuda)
#   main-job    the main job on 1 GPU under ZeRO-2 with --precision bf16
#   bench       the kt-small benchmark (five runs), CUDA peak memory per run
#   memory      Single-step encoder memory by chunk size and gradient checkpointing, on CUDA
# then summary.md with the card's name and the figures. On a machine without a GPU every part
# is skipped, with one line saying so. Uses .venv/bin/python, or python3 where there is none.
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-outputs/gpu-check}"
mkdir -p "$DIR"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
failed=0

gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)"
{
  date -u
  echo "gpu: ${gpu:-none}"
  "$PY" -c 'import torch, transformers, deepspeed, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "accelerate", accelerate.__version__)' 2>&1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} >"$DIR/machine.txt" 2>&1

if [ -z "$gpu" ]; then
  echo "gpu check: no CUDA GPU on this machine; skipped its CUDA parts (tests, main-job, bench, memory)"
  exit 0
fi

part() {  # part NAME SECONDS COMMAND...: run on the GPU, log to DIR/NAME.log
  local name="$1" limit="$2" start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$DIR/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(($(date +%s) - start)) s (log: $DIR/$name.log)"
  [ "$rc" = 0 ] || failed=1
}

part tests 150 env GRAM_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_equivalence.py tests/test_counts.py
part main-job 150 "$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
  --mixed_precision no --dynamo_backend no launch/train.py --config ds_configs/zero2.json \
  --precision bf16 --no-progress --output-dir "$DIR/main-job" --overwrite-output-dir
part bench 150 "$PY" -m gram_scale.bench --workload kt-small --out "$DIR/bench"
part memory 90 env GRAM_DEVICE=cuda "$PY" -m gram_scale.bench.memory --out "$DIR/memory"

"$PY" - "$DIR" "$gpu" >"$DIR/summary.md" <<'EOF'
import json, pathlib, re, sys

d, gpu = pathlib.Path(sys.argv[1]), sys.argv[2]
out = [f"# GPU check on {gpu}", ""]
log = d / "tests.log"
if log.exists():
    tail = [l for l in log.read_text().splitlines() if re.search(r"passed|failed|error", l)]
    out += [f"tests (exactness and counts on CUDA): {tail[-1] if tail else 'no result'}", ""]
m = d / "main-job" / "metrics.json"
if m.exists():
    r = json.loads(m.read_text())
    peak = r.get("cuda_peak_bytes") or 0
    out += [f"main job (1 GPU, ZeRO-2, bf16): test AUC {r['test'].get('auc', float('nan')):.4f}, "
            f"{r['train_seconds']:.1f} s of training, CUDA peak {peak / 2**20:,.0f} MiB, "
            f"encoder {r.get('encoder_numerics')}", ""]
for name in ("bench", "memory"):
    md = d / name / "results.md"
    if md.exists():
        out += [f"## {name}", "", md.read_text(), ""]
print("\n".join(out))
EOF
echo "summary: $DIR/summary.md"
exit "$failed"
