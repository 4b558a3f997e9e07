#!/usr/bin/env bash
# Train several MNIST posterior flows side by side on one GPU (one process each), then score them all.
#
#     SECONDS_PER_FLOW=450 OUT_DIR=runs/image bash scripts/image_runs.sh scripts/image_runs/levers.txt
#
# The spec file has one run per line, `NAME train.py-arguments...` ('#' starts a comment); each run's arguments
# are added after the common ones below (the hybrid objective at APS weight 1, batch 64, bf16, EMA, over train.py's
# default image recipe), so a line
# may override any of them (argparse keeps the last value). Runs write OUT_DIR/NAME; then
# `benchmark.py RUN --solvers aps` scores every run on 200 held-out digits x 100 samples into OUT_DIR/NAME/benchmark/.
#
# Why processes side by side: these flows are bound by kernel-launch overhead, not arithmetic, so processes
# overlap on one GPU (H100, batch 64: 3.5 steps/s alone, 3.3 each with four; H200, by train_step_benchmark.py: 4.8 alone,
# 4.4-4.6 each with four; 43 ms of GPU work in a 209 ms step: BENCHMARKS.md "Training-step speed"). Each run stops at its time budget
# (or pauses there with STOP_AFTER, to be continued by `train.py --out OUT_DIR/NAME --resume`); the LR decay and
# tempering follow the budget. Knobs: SECONDS_PER_FLOW (240), BATCH_SIZE (64), STOP_AFTER (0 = off),
# THROUGHPUT (1000: the batch size whose samples/s is timed), DEVICE (cuda), N_HELDOUT (200).
set -euo pipefail
SPEC=${1:?usage: bash scripts/image_runs.sh SPEC_FILE}
BUDGET=${SECONDS_PER_FLOW:-240}
BATCH=${BATCH_SIZE:-64}
OUT=${OUT_DIR:-runs/image}
mkdir -p "$OUT"
COMMON=(--prior checkpoints/mnist-prior --data mnist --steps 100000 --max-seconds "$BUDGET" --stop-after "${STOP_AFTER:-0}"
        --batch-size "$BATCH" --n-z 2 --n-elbo 2 --aps-weight 1 --fkl-weight 1 --temper-start 0.3 --temper-frac 0.3
        --lr 5e-4 --warmup 100 --mixed-precision bf16 --ema-decay 0.999 --keep 1
        --checkpoint-every 1000000 --log-every 100 --sample-every 1000)
names=() pids=()
while read -r name args; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  # shellcheck disable=SC2086
  python3 train.py "${COMMON[@]}" $args --out "$OUT/$name" > "$OUT/train-$name.log" 2>&1 &
  names+=("$name") pids+=($!)
done < <(sed 's/#.*//' "$SPEC")
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
dirs=()
for name in "${names[@]}"; do
  echo "== $name: $(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print('step', c['step'], 'in', c.get('train_seconds'), 's')" "$OUT/$name/config.json" 2>/dev/null || echo FAILED)"
  tail -c 300 "$OUT/train-$name.log" | tr '\r' '\n' | tail -n 1
  [ -f "$OUT/$name/flow.safetensors" ] && dirs+=("$OUT/$name")
done
for dir in "${dirs[@]}"; do
  python3 benchmark.py "$dir" --solvers aps --device "${DEVICE:-cuda}" --n-measurements "${N_HELDOUT:-200}" \
    --n-samples 100 --throughput-batch "${THROUGHPUT:-1000}" --out "$dir/benchmark" --no-progress
done
[ "$status" = 0 ] || { echo "a training run failed"; exit 1; }
