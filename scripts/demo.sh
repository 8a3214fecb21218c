#!/usr/bin/env bash
# The README's main job on the bundled sample: write the sample volume, segment it with the
# packaged default model, and score the segmentation against the sample's ground truth.
# Usage: scripts/demo.sh BIN_DIR OUT_DIR
set -euo pipefail
bin=${1:-.venv/bin}
out=${2:-demo}

"$bin/ssn-deploy" sample "$out" --overwrite
"$bin/ssn-deploy" infer "$out/raw.zarr" -o "$out/seg.zarr" --overwrite
"$bin/ssn-deploy" evaluate "$out/seg.zarr/segmentation" "$out/labels.zarr"
echo "demo finished: segmentation in $out/seg.zarr, preview in $out/seg.preview.png"
