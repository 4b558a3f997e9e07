#!/usr/bin/env bash
# Train the four shipped MNIST posterior flows side by side on one GPU, then score them:
#
#     SECONDS_PER_FLOW=450 OUT_DIR=runs/image bash scripts/train_image_flows.sh   # then train longer: image_runs/finetune.txt
#
# = scripts/image_runs.sh with scripts/image_runs/shipped.txt (the recipe and the knobs are there).
exec bash "$(dirname "$0")/image_runs.sh" "$(dirname "$0")/image_runs/shipped.txt"
