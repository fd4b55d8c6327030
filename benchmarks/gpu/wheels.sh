#!/usr/bin/env bash
# `make gpu-wheels`: write .whl/, the wheels the GPU suite (benchmarks/gpu/run.sh) imports and the GPU machine lacks
# (its package list: the device tool's KINDS.md), at the versions of this venv, for cp312 manylinux x86-64.
# Binary wheels come from the registry for that platform; deepspeed and antlr4 (sdists only) are built here as
# pure-Python wheels (DS_BUILD_OPS=0: DeepSpeed JIT-builds what it needs, and the suite's path needs no op).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
# pydantic 2.14 needs typing-extensions >= 4.16: carried, since the machine's version is not documented.
PACKAGES=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson webdataset braceexpand
          lightly hydra-core omegaconf)
BUILT=(deepspeed antlr4-python3-runtime)
# this machine's pip config may name local indexes that do not exist: pip warns of each, which says nothing here
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
rm -rf "$DEST"
mkdir -p "$DEST"
pins=()
for name in "${PACKAGES[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${pins[@]}"
for name in "${BUILT[@]}"; do
    pin="$name==$(version "$name")"
    # a pure-Python wheel from the registry if there is one, else built from the sdist here
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --abi none --platform any -d "$DEST" "$pin" 2>/dev/null ||
        DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$pin"
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
