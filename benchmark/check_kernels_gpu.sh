#!/usr/bin/env bash
# The Pallas kernels compiled for the GPU and checked against their XLA references, and the
# references on the GPU against the numpy oracle: tests/test_pallas_*.py (one file per op, the
# harness in tests/pallas_cases.py) and tests/test_kv_quant_kernels.py (the ops over quantized
# pools) with LMDEPLOY_JAX_KERNELS=pallas (the tests' switch from the interpreter to the compiled
# kernels), then tests/test_kernel_references.py with
# LMDEPLOY_JAX_KERNELS=reference. Sliding windows, soft-capped scores and 256-wide heads (Gemma)
# included.
#
# On the GPU machine (device tool), from the repository root:
#     bash benchmark/check_kernels_gpu.sh [PYTEST ARGS]        # e.g. -k window: the windowed cases only
# The log: $OUT/check_kernels_gpu.log. The image's python3 has JAX, Triton and pytest.
# Float32 matmuls of the references run at full precision (not TF32), as the kernels' do.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${OUT:-/tmp}/check_kernels_gpu.log
export PYTHONUNBUFFERED=1 JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import jax, triton; print("jax", jax.__version__, "triton", triton.__version__, jax.devices())' 2>&1 |
    tee "$log"
LMDEPLOY_JAX_KERNELS=pallas python3 -m pytest -q -p no:cacheprovider tests/test_pallas_*.py tests/test_kv_quant_kernels.py \
    "$@" 2>&1 | tee -a "$log"
kernels=${PIPESTATUS[0]}
LMDEPLOY_JAX_KERNELS=reference python3 -m pytest -q -p no:cacheprovider tests/test_kernel_references.py "$@" 2>&1 |
    tee -a "$log"
references=${PIPESTATUS[0]}
echo "kernels: exit $kernels, references: exit $references (5: no test matched)" | tee -a "$log"
exit $(( (kernels != 0 && kernels != 5) || (references != 0 && references != 5) ))
