# Sourced by the device scripts (run_vs_lmdeploy.sh, run_tensor_parallel.sh) with their arguments
# after the log's name: from the repository root, the random-weight model directory of shape $2
# (default llama3-8b) under /tmp, made once with .peer/make_random_model.py; the throughput
# workload (PROMPTS / INPUT_LEN / OUTPUT_LEN); the emptied log $OUT/$1.log; and the carried wheels
# of .whl/ installed (benchmark/prepare_device_wheels.sh).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shape=${2:-llama3-8b}
model=/tmp/$shape
log=${OUT:-/tmp}/$1.log
prompts=${PROMPTS:-1000}; input_len=${INPUT_LEN:-512}; output_len=${OUTPUT_LEN:-256}
export PYTHONUNBUFFERED=1
: > "$log"
# the packages the image lacks (flax and its imports), carried as wheels (prepare_device_wheels.sh)
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl 2>&1 | tail -2
fi
[ -f "$model/config.json" ] || python3 .peer/make_random_model.py "$shape" "$model" 2>&1 | tee -a "$log"
