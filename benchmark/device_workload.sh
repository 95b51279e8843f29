# Sourced by the device scripts (run_vs_lmdeploy.sh, run_tensor_parallel.sh) with their arguments
# after the log's name: from the repository root, the random-weight model directory of shape $2
# (default llama3-8b) under /tmp, made once with .peer/make_random_model.py; the throughput
# workload (PROMPTS / INPUT_LEN / OUTPUT_LEN); and the emptied log $OUT/$1.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
shape=${2:-llama3-8b}
model=/tmp/$shape
log=${OUT:-/tmp}/$1.log
prompts=${PROMPTS:-1000}; input_len=${INPUT_LEN:-512}; output_len=${OUTPUT_LEN:-256}
export PYTHONUNBUFFERED=1
: > "$log"
[ -f "$model/config.json" ] || python3 .peer/make_random_model.py "$shape" "$model" 2>&1 | tee -a "$log"
