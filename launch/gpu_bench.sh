#!/usr/bin/env bash
# Benchmark alexnet_jax against PyTorch on this machine's GPU, and write the comparison as a markdown table.
#
# For each model (owt, bn) and batch (256, 1024), in bfloat16 at 224 px:
#   python -m alexnet_jax.bench loop --json         the bare train step and the fed loop, in one process (img/s,
#                                                   MFU)
#   python -m alexnet_jax.bench.torch_reference     the same model, optimizer (SGD momentum 0.9, weight decay, clip
#                                                   at global norm) and step in PyTorch: torch.compile, bf16
#                                                   autocast, channels_last
# then prints the table and writes it to $OUT. Runs from anywhere; works in the checkout it belongs to. Made to
# finish within 8 minutes on one H100-class GPU.
#
# Usage:
#   launch/gpu_bench.sh                    # pip install -e . first (needs the package index)
#   WHEELS=DIR launch/gpu_bench.sh         # offline: install the packages the machine lacks from DIR/*.whl
#   DRY_RUN=1 launch/gpu_bench.sh          # print the commands, run nothing, write nothing
#
# Optional environment:
#   WHEELS     folder of wheels for a machine with no network that already has jax (CUDA), flax, optax,
#              orbax-checkpoint and torch: they are installed with `pip install --no-index --no-deps --target
#              $SITE_DIR` and put on PYTHONPATH (nothing outside $SITE_DIR is changed)
#   SITE_DIR   where WHEELS are installed (default: .gpu_bench_site in the checkout)
#   PYTHON     interpreter (default: python3)
#   OUT        the markdown table (default: gpu_bench.md in the checkout)
#   LOG_DIR    every run's full output (default: gpu_bench_logs in the checkout)
#   VARIANTS   models (default: "owt bn");  BATCHES  global batches (default: "256 1024")
#   STEPS      timed steps per run (default: 30);  WORKERS  grain workers of the fed loop (default: nproc)
#   RUN_TIMEOUT  seconds any one run may take before it is stopped (default: 100)
#   BUDGET     seconds for everything, installation included (default: 470): a run gets at most what is left,
#              and runs that would start with under 20 s left are skipped (their cells show "-")
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_bench.md}
LOG_DIR=${LOG_DIR:-$PWD/gpu_bench_logs}
SITE_DIR=${SITE_DIR:-$PWD/.gpu_bench_site}
VARIANTS=${VARIANTS:-owt bn}
BATCHES=${BATCHES:-256 1024}
STEPS=${STEPS:-30}
WORKERS=${WORKERS:-$(nproc)}
RUN_TIMEOUT=${RUN_TIMEOUT:-100}
BUDGET=${BUDGET:-470}
DRY_RUN=${DRY_RUN:-0}

say() { printf '+ %s\n' "$*" >&2; }

# Runs a command (or only prints it under DRY_RUN=1).
run() {
  say "$@"
  [[ $DRY_RUN == 1 ]] || "$@"
}

# Runs a benchmark with its stdout kept in LOG (the JSON object is its last line); a failed or stopped run is
# reported and leaves its row's cells empty rather than ending the whole benchmark.
bench() {
  local log=$1
  shift
  say "$@" ">" "$log"
  [[ $DRY_RUN == 1 ]] && return 0
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then
    echo "warning: skipped, ${BUDGET} s budget spent: $*" >&2
    return 0
  fi
  timeout "$((left < RUN_TIMEOUT ? left : RUN_TIMEOUT))" "$@" >"$log" ||
    echo "warning: failed or timed out (see $log): $*" >&2
}

if [[ -n ${WHEELS:-} ]]; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: WHEELS=$WHEELS: no .whl files there" >&2
    exit 2
  fi
  run "$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE_DIR" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE_DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  run "$PYTHON" -m pip install -q -e .
fi

[[ $DRY_RUN == 1 ]] || mkdir -p "$LOG_DIR"
for variant in $VARIANTS; do
  for batch in $BATCHES; do
    bench "$LOG_DIR/jax_${variant}_${batch}.txt" "$PYTHON" -m alexnet_jax.bench loop --json \
      --config=configs/imagenet.py --config.model.variant="$variant" --config.batch_size="$batch" \
      --config.model.dtype=bfloat16 --config.log_every_steps=10 --steps="$STEPS" --warmup=3 --workers="$WORKERS"
    bench "$LOG_DIR/torch_${variant}_${batch}.txt" "$PYTHON" -m alexnet_jax.bench.torch_reference --json \
      --variant="$variant" --batch_size="$batch" --dtype=bfloat16 --compile --steps="$STEPS" --warmup=5
  done
done

run "$PYTHON" -m alexnet_jax.bench.table --logs="$LOG_DIR" --out="$OUT"
[[ $DRY_RUN == 1 ]] || echo "done in ${SECONDS} s; table in $OUT, logs in $LOG_DIR" >&2
