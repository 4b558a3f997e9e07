#!/usr/bin/env bash
# Train the four shipped MNIST posterior flows side by side on one GPU, then score them.
#
#     SECONDS_PER_FLOW=240 OUT_DIR=runs/image bash scripts/train_image_flows.sh   # the shipped inpaint/sr/classifier flows
#
# BATCH_SIZE (64) and CLASSIFIER_FKL (1) are knobs; batch 128 and forward-KL weight 10 did not help (BENCHMARKS.md,
# "Retraining runs").
#
# The four runs share the GPU as separate processes; each is bound by kernel-launch overhead, not arithmetic,
# so they overlap well (H100, batch 64: 3.3 steps/s each with four processes, 3.5 with two). Each stops at its time budget; the LR decay and tempering follow
# the budget. Then scripts/image_benchmark.py scores every flow on 200 held-out digits.
set -euo pipefail
BUDGET=${SECONDS_PER_FLOW:-240}
BATCH=${BATCH_SIZE:-64}
OUT=${OUT_DIR:-runs/image}
mkdir -p "$OUT"
COMMON=(--prior checkpoints/mnist-prior --data mnist --steps 100000 --max-seconds "$BUDGET"
        --batch-size "$BATCH" --n-z 2 --n-elbo 2 --fkl-weight 1 --temper-start 0.3 --temper-frac 0.3
        --lr 5e-4 --warmup 100 --mixed-precision bf16 --ema-decay 0.999
        --checkpoint-every 1000000 --log-every 100 --sample-every 1000)
declare -A ARGS=(
  [denoise]="--operator denoise --op-arg sigma_y=0.2"
  [inpaint_box]="--operator inpaint_box"
  [sr]="--operator sr --op-arg factor=4"
  # The classifier flow collapses at weight 1 and at 10 alike (see its card and BENCHMARKS.md).
  [classifier]="--operator classifier --fkl-weight ${CLASSIFIER_FKL:-1}"
)
pids=()
for op in denoise inpaint_box sr classifier; do
  # shellcheck disable=SC2086
  python3 train.py "${COMMON[@]}" ${ARGS[$op]} --out "$OUT/mnist-$op-flow" > "$OUT/train-$op.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for op in denoise inpaint_box sr classifier; do
  echo "== $op: $(python3 -c "import json,sys; print('step', json.load(open(sys.argv[1]))['step'])" "$OUT/mnist-$op-flow/config.json" 2>/dev/null || echo FAILED)"
  tail -c 400 "$OUT/train-$op.log" | tr '\r' '\n' | tail -n 2
done
[ "$status" = 0 ] || { echo "a training run failed"; exit 1; }
python3 scripts/image_benchmark.py "$OUT"/mnist-{denoise,inpaint_box,sr,classifier}-flow --device cuda \
  --n-heldout 200 --n-samples 100 --throughput 1000 10000 --out "$OUT/benchmark.json" --grid-dir "$OUT/grids"
