#!/usr/bin/env bash
# Train the five shipped MNIST posterior flows side by side on one GPU, each by its recipe, then score them:
#
#     OUT_DIR=runs/shipped bash scripts/train_image_flows.sh
#
# Each first stage (aps/recipes/mnist-<op>-flow-stage1.toml; inpaint_box's only stage, mnist-inpaint_box-flow) is
# the default image recipe image-wide for its operator with bf16 and a time budget: 360 s for denoise and
# inpaint_box, 430 s for sr, deblur and the classifier. The others then have a second stage (the recipe
# mnist-<op>-flow: the prior's reverse-KL term beside forward KL from the first stage's weights; 1,320 steps for sr
# and deblur, 300 s for denoise and the classifier), trained side by side after the first stages. The shipped
# checkpoints are such runs on one H200 (2026-12-03/04; each card gives its steps and what ran beside it).
# The flows are bound by kernel-launch overhead, so processes side by side share one GPU well (BENCHMARKS.md,
# "Training-step speed"). Then `benchmark.py RUN --solvers aps` scores each on 200 held-out digits x 100 samples into
# OUT_DIR/NAME/benchmark/. Knobs: NAMES (the recipes to train; default all five), OUT_DIR (runs/shipped), DEVICE
# (cuda), N_HELDOUT (200), EXTRA (more train.py arguments for every run, e.g. "--max-seconds 60").
set -euo pipefail
OUT=${OUT_DIR:-runs/shipped}
mkdir -p "$OUT"
# shellcheck disable=SC2206
names=(${NAMES:-mnist-denoise-flow mnist-sr-flow mnist-inpaint_box-flow mnist-deblur-flow mnist-classifier-calibrated-flow})
# a two-stage recipe (sr, deblur: aps/recipes/NAME-stage1.toml exists) trains its first stage beside the others,
# then its second from the first's weights
side_by_side() {  # $1 = stage1 | stage2, then the recipes to train side by side: NAME -> OUT/NAME
  local stage=$1 pids=() name init
  shift
  for name in "$@"; do
    init=()
    if [ "$stage" = stage2 ]; then init=(--init-from "$OUT/$name-stage1"); fi
    # shellcheck disable=SC2086
    python3 train.py --recipe "$name" "${init[@]}" ${EXTRA:-} --out "$OUT/$name" > "$OUT/train-$name.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
}
status=0
first=() second=()
for name in "${names[@]}"; do
  if [ -f "aps/recipes/$name-stage1.toml" ]; then first+=("$name-stage1"); second+=("$name"); else first+=("$name"); fi
done
side_by_side stage1 "${first[@]}"
[ ${#second[@]} = 0 ] || side_by_side stage2 "${second[@]}"
for name in "${names[@]}"; do
  echo "== $name: $(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print('step', c['step'], 'in', c.get('train_seconds'), 's')" "$OUT/$name/config.json" 2>/dev/null || echo FAILED)"
  if [ -f "$OUT/$name/flow.safetensors" ]; then
    python3 benchmark.py "$OUT/$name" --solvers aps --device "${DEVICE:-cuda}" --n-measurements "${N_HELDOUT:-200}" \
      --n-samples 100 --out "$OUT/$name/benchmark" --no-progress | grep '^| aps' || status=1
  fi
done
[ "$status" = 0 ] || { echo "a training or scoring run failed"; exit 1; }
