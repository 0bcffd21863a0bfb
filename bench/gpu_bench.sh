#!/usr/bin/env bash
# The GPU benchmark (bench/gpu_bench.py: the paper-size table, speed options side by side),
# prepared for a device machine, which has torch but no monai and no network.
#
#   bash bench/gpu_bench.sh --prepare           here, where pip reaches PyPI: the wheels of monai and
#                                               safetensors into .whl/ (requirements-dev.txt), git-ignored
#   run(command="bash bench/gpu_bench.sh --json $OUT/gpu_bench.json", carry=[".whl"], timeout_s=540)
#                                               on the device machine (the device tool): under 8 minutes
#   bash bench/gpu_bench.sh --device cpu --quick   anywhere: the tiny model, end to end in seconds
#
# Other arguments go to bench/gpu_bench.py. PYTHON picks the interpreter (default python3, the
# one that holds PyTorch on the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=.whl

if [ "${1:-}" = "--prepare" ]; then
    wheels=$(grep -m1 -e '^monai==' requirements-dev.txt; grep -m1 -e '^safetensors==' requirements-dev.txt)
    exclude=$(git rev-parse --git-path info/exclude)
    grep -qx "/$WHEELS/" "$exclude" 2>/dev/null || echo "/$WHEELS/" >>"$exclude"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --dest "$WHEELS" $wheels
    ls "$WHEELS"
    exit 0
fi

if ! "$PYTHON" -c "import monai, safetensors" 2>/dev/null; then
    if ! compgen -G "$WHEELS/monai-*.whl" >/dev/null || ! compgen -G "$WHEELS/safetensors-*.whl" >/dev/null; then
        echo "error: monai or safetensors is not installed and $WHEELS/ lacks its wheel; run 'bash bench/gpu_bench.sh" \
             "--prepare' where pip reaches PyPI, and carry $WHEELS" >&2
        exit 1
    fi
    site=$(mktemp -d)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/VCMSynthesis${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# 7.5 minutes at most, so that the device tool's call (limit 8 minutes here) returns the output.
exec timeout 450 "$PYTHON" bench/gpu_bench.py "$@"
