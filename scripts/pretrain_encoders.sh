#!/usr/bin/env bash
# Recipe for the packaged selection encoders (ssn_deploy/assets/encoders/):
#   scripts/pretrain_encoders.sh [DATA] [RUNS]
# Builds the CC BY pretraining volumes (scripts/make_pretrain_data.py), then runs SimSiam
# for each voxel size; rerunning continues an interrupted run (--resume). One thread each so
# that both fit on a 2-core machine side by side.
set -euo pipefail
DATA=${1:-../shared/data}
RUNS=${2:-runs}
D=$RUNS/encoder_data
[ -d "$D/fib_medulla_520_aniso5.zarr" ] || python scripts/make_pretrain_data.py "$DATA" "$D"
resume() { [ -f "$1/last.ckpt" ] && echo --resume || true; }
ssn-deploy pretrain "$D/fib_medulla_520_aniso5.zarr" "$D/aniso5_train.zarr" \
  -o "$RUNS/encoder_aniso" --crop 18,64,64 --iterations 600 --batch-size 4 --threads 1 \
  --checkpoint-every 25 $(resume "$RUNS/encoder_aniso") &
ssn-deploy pretrain "$DATA/fib_medulla_520_raw.hdf:volumes/raw" "$D/fib_medulla_250_train.zarr" \
  -o "$RUNS/encoder_iso" --crop 64,64,64 --iterations 800 --batch-size 2 --threads 1 \
  --checkpoint-every 25 $(resume "$RUNS/encoder_iso") &
wait
