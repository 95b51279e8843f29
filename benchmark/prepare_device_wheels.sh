#!/usr/bin/env bash
# The wheels the GPU machine's image lacks for our engine, downloaded here into .whl/ (carry it:
# `carry: [".whl", ...]`); the device scripts (device_workload.sh) install them when .whl is there.
# flax's nnx imports optax, treescope, rich and msgpack; the image's JAX (0.11.x) needs flax 0.12.12
# or later (flax 0.12.8 fails there on jax.experimental.hijax).
#     bash benchmark/prepare_device_wheels.sh && echo /.whl/ >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl flax==0.12.12 optax==0.2.8 treescope==0.1.10 rich==15.0.0 markdown-it-py mdurl \
    pygments msgpack==1.2.4 absl-py
du -sh .whl
