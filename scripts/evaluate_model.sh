#!/usr/bin/env bash
# Test-region metrics for a model card, produced only by `ssn-deploy infer` + `ssn-deploy evaluate`.
# Usage: scripts/evaluate_model.sh MODEL OUT_DIR [DATA_DIR] [extra infer options...]
# MODEL is 'default', a .ckpt or an .onnx; the no-network baseline ('intensity') runs too.
set -euo pipefail
model=${1:?model}
out=${2:?output directory}
data=${3:-../shared/data}
shift $(( $# < 3 ? $# : 3 ))
bin=$(dirname "$(command -v ssn-deploy)")
mkdir -p "$out"
src="$data/fib_medulla_250.hdf"
# the test region: z in [125, 250), never used for training or checkpoint selection
[ -e "$out/test_raw.zarr" ] || "$bin/ssn-deploy" convert "$src:volumes/raw" "$out/test_raw.zarr" --roi 125:250,:,: --no-progress
[ -e "$out/test_gt.zarr" ] || "$bin/ssn-deploy" convert "$src:volumes/labels/neuron_ids" "$out/test_gt.zarr" --roi 125:250,:,: --no-progress
for name in model baseline; do
  m=$model; [ "$name" = baseline ] && m=intensity
  "$bin/ssn-deploy" infer "$out/test_raw.zarr" -o "$out/$name.zarr" --model "$m" --overwrite --no-progress "$@"
  "$bin/ssn-deploy" evaluate "$out/$name.zarr/segmentation" "$out/test_gt.zarr" --json --output "$out/$name.json" --overwrite > /dev/null
  "$bin/ssn-deploy" evaluate "$out/$name.zarr/segmentation" "$out/test_gt.zarr" --ignore-id 135478 --json --output "$out/${name}_no_glia.json" --overwrite > /dev/null
  echo "$name: $(python3 -c "import json,sys; d=json.load(open('$out/$name.json')); print('VOI split %.3f merge %.3f total %.3f ARAND %.3f' % (d['voi_split'], d['voi_merge'], d['voi'], d['arand']))")"
done
