#!/usr/bin/env bash
# One lent-GPU session for issue 16 (Default models): train both paper-sized default models
# (configs/gpu/*.yaml) side by side on the one GPU within a wall-clock budget, then measure
# the models' GPU throughput (benchmarks/gpu_model.py). Run from the repository root on the
# device machine, with the two FIB volumes copied to .gpu_data/ and the cp312 wheels of edt
# and fastremap (missing from the device image) in .whl/, both carried:
#
#   bash scripts/device_default_models.sh MINUTES
#
# Results (logs, best checkpoints, run records, throughput JSON) go to $OUT.
# DRYRUN=1 runs the same steps on the CPU with small shapes, to test the plumbing here.
set -u
MINUTES=${1:-7}
OUT=${OUT:-/tmp/device_out}
DATA=$PWD/.gpu_data
mkdir -p "$OUT" /tmp/cfg /tmp/runs
if [ -z "${DRYRUN:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
RUNS="fib_medulla_250_paper fib_medulla_250_aniso5_paper"
for r in $RUNS; do
    sed "s#\.\./\.\./\.\./shared/data#$DATA#" "configs/gpu/$r.yaml" > "/tmp/cfg/$r.yaml"
    if [ -n "${DRYRUN:-}" ]; then
        sed -i 's/device: cuda/device: cpu/; s/batch_size: 8/batch_size: 1/;
                s/crop: \[64, 128, 128\]/crop: [32, 32, 32]/; s/crop: \[16, 192, 192\]/crop: [4, 32, 32]/;
                s/loader_workers: [0-9]*/loader_workers: 2/; s/val_every: 250/val_every: 20/' \
            "/tmp/cfg/$r.yaml"
    fi
done
python3 -c "import torch, ssn_deploy.cli, ssn_deploy.agglomeration, edt, fastremap, numba, skimage
print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
pids=""
for r in $RUNS; do
    python3 -m ssn_deploy.cli -v train "/tmp/cfg/$r.yaml" -o "/tmp/runs/$r" \
        --time-budget "$MINUTES" > "$OUT/$r.log" 2>&1 &
    pids="$pids $!"
done
# fail fast (the probe validates at iteration 10): a broken run costs a minute, not the lease
sleep 75
for p in $pids; do
    if ! kill -0 "$p" 2>/dev/null; then
        echo "a training stopped early:"; tail -n 40 "$OUT"/*.log; kill $pids 2>/dev/null; exit 1
    fi
done
status=0
for p in $pids; do wait "$p" || status=1; done
grep -h "time budget\|best.ckpt is now" "$OUT"/*.log | tail -n 20
for r in $RUNS; do
    cp "/tmp/runs/$r/best.ckpt" "$OUT/$r.best.ckpt" || status=1
done
tar -C /tmp/runs -cf "$OUT/run_records.tar" \
    $(cd /tmp/runs && ls -d */config.yaml */log.csv */environment.jsonl) || status=1
if [ -z "${DRYRUN:-}" ]; then  # after the copies: a slow benchmark cannot cost the models
    timeout 100 python3 benchmarks/gpu_model.py --data "$DATA" --output "$OUT/gpu_model.json" \
        || status=1
fi
ls -la "$OUT"
exit $status
