#!/usr/bin/env bash
# Test-region metrics for a model card, produced only by `ssn-deploy infer` + `ssn-deploy evaluate`.
# Usage: [DATASET=fib_medulla_250|fib_medulla_250_aniso5] [ROI=Z0:Z1,Y0:Y1,X0:X1] \
#        scripts/evaluate_model.sh MODEL OUT_DIR [DATA_DIR] [extra infer options...]
# ROI replaces the dataset's test region (e.g. the validation sections, for a model card).
# MODEL is 'default', 'iso', 'aniso', a .ckpt or an .onnx; the no-network baseline
# ('intensity') runs too, and the one-segment reference (every voxel one id) is scored.
set -euo pipefail
model=${1:?model}
out=${2:?output directory}
data=${3:-../shared/data}
shift $(( $# < 3 ? $# : 3 ))
dataset=${DATASET:-fib_medulla_250}
case "$dataset" in
  # the test regions, never used for training or checkpoint selection
  fib_medulla_250) roi=125:250,:,:; glia=(--ignore-id 135478) ;;
  fib_medulla_250_aniso5) roi=25:50,:,:; glia=() ;;
  *) echo "unknown DATASET $dataset" >&2; exit 2 ;;
esac
roi=${ROI:-$roi}
bin=$(dirname "$(command -v ssn-deploy)")
mkdir -p "$out"
src="$data/$dataset.hdf"
[ -e "$out/test_raw.zarr" ] || "$bin/ssn-deploy" convert "$src:volumes/raw" "$out/test_raw.zarr" --roi "$roi" --no-progress
[ -e "$out/test_gt.zarr" ] || "$bin/ssn-deploy" convert "$src:volumes/labels/neuron_ids" "$out/test_gt.zarr" --roi "$roi" --no-progress
summary() {
  "$bin/python" -c "import json,sys; d=json.load(open('$1')); print('VOI split %.3f merge %.3f total %.3f ARAND %.3f' % (d['voi_split'], d['voi_merge'], d['voi'], d['arand']))"
}
[ -e "$out/one_segment.zarr" ] || "$bin/python" -c "
import numpy as np
from ssn_deploy.volumes import create_volume, open_volume
gt = open_volume('$out/test_gt.zarr')
create_volume('$out/one_segment.zarr', gt.shape, np.uint64, voxel_size=gt.voxel_size, fill_value=1)
"
"$bin/ssn-deploy" evaluate "$out/one_segment.zarr" "$out/test_gt.zarr" --json --output "$out/one_segment.json" --overwrite > /dev/null
echo "one_segment: $(summary "$out/one_segment.json")"
for name in ${NAMES:-model baseline}; do
  m=$model; [ "$name" = baseline ] && m=intensity
  "$bin/ssn-deploy" infer "$out/test_raw.zarr" -o "$out/$name.zarr" --model "$m" --overwrite --no-progress "$@"
  "$bin/ssn-deploy" evaluate "$out/$name.zarr/segmentation" "$out/test_gt.zarr" --json --output "$out/$name.json" --overwrite > /dev/null
  if [ ${#glia[@]} -gt 0 ]; then
    "$bin/ssn-deploy" evaluate "$out/$name.zarr/segmentation" "$out/test_gt.zarr" "${glia[@]}" --json --output "$out/${name}_no_glia.json" --overwrite > /dev/null
  fi
  echo "$name: $(summary "$out/$name.json")"
done
