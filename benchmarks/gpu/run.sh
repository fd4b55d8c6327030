#!/usr/bin/env bash
# The GPU readiness suite in one command (issue 21; CONTRIBUTING.md says when and how to run it):
#
#   bash benchmarks/gpu/run.sh [--smoke] [--only imports,kernels,masking,peers,train,data]
#
# On the GPU machine: installs .whl/ (`make gpu-wheels`, carried with the tree) into a target folder with
# `pip install --no-index --no-deps --target`, puts it first on PYTHONPATH, then runs benchmarks/gpu/suite.py, which
# writes each step's JSON to $OUT (default outputs/gpu-suite) as soon as the step ends, and prints one line per
# step. About 4 to 5 minutes on an H100. --smoke: the same steps on CPU with tiny shapes and interpreted kernels,
# in the project's venv (no .whl/ needed): what tests/test_gpu_suite.py runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ $smoke = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
if [ $smoke = 0 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        site=${MASKRAY_WHEEL_SITE:-/tmp/maskray-site}
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
            || { echo "run.sh: installing .whl/ failed" >&2; exit 2; }
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "run.sh: no .whl/ here (make gpu-wheels): using the packages installed" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/outputs/gpu-suite}
exec "$PY" benchmarks/gpu/suite.py --out "$OUT" "$@"
