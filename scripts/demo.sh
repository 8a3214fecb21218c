#!/usr/bin/env bash
# The README's main job on the bundled sample: write the sample volume, then evaluate.
# Usage: scripts/demo.sh BIN_DIR OUT_DIR
set -euo pipefail
bin=${1:-.venv/bin}
out=${2:-demo}

"$bin/ssn-deploy" sample "$out" --overwrite
"$bin/ssn-deploy" evaluate "$out/labels.zarr" "$out/labels.zarr"
echo "demo finished: outputs in $out/"
