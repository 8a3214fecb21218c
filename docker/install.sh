#!/usr/bin/env bash
# Install ssn-deploy into a fresh virtual environment: the one recipe that the Dockerfile runs
# and that tests/test_docker.py runs in CI (Docker itself cannot run there).
#
#   docker/install.sh cli PREFIX [EXTRAS]   ssn-deploy[EXTRAS] (default gpu,serve) with its
#                                           dependencies, pinned by constraints.txt: the command
#                                           line and dask workers
#   docker/install.sh server PREFIX         the environment of Triton's python backend: numpy<2,
#                                           onnxruntime and the agglomeration packages (the list
#                                           ssn_deploy.serving.environment keeps), and ssn-deploy
#                                           itself without dependencies (no torch, zarr or dask)
#
# SRC (default: the repository holding this script) is what gets installed; PYTHON (default:
# python3) makes the virtual environment. Nothing outside PREFIX is written but pip's cache
# (the Dockerfile turns it off).
set -euo pipefail

usage="usage: docker/install.sh cli|server PREFIX [EXTRAS]"
mode=${1:?$usage}
prefix=${2:?$usage}
extras=${3:-gpu,serve}
src=${SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
python=${PYTHON:-python3}

if [[ -e "$prefix" ]]; then
    echo "install.sh: $prefix exists; give a new folder" >&2
    exit 2
fi
"$python" -m venv "$prefix"
pip=("$prefix/bin/python" -m pip install --disable-pip-version-check --quiet)

case "$mode" in
    cli)
        "${pip[@]}" -c "$src/constraints.txt" "$src[$extras]"
        ;;
    server)
        mapfile -t requirements < <(
            PYTHONPATH="$src" "$python" -m ssn_deploy.serving.environment --no-pytriton
        )
        "${pip[@]}" "${requirements[@]}"
        "${pip[@]}" --no-deps "$src"
        ;;
    *)
        echo "$usage" >&2
        exit 2
        ;;
esac
"$prefix/bin/python" -c "import ssn_deploy, numpy; print(f'ssn-deploy {ssn_deploy.__version__}, numpy {numpy.__version__} in $prefix')"
