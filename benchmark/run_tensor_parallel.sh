#!/usr/bin/env bash
# Tensor parallelism on one multi-GPU machine, in one run: for each tp, offline throughput and
# batch-1 decode of one random-weight model, then each tp's figures against tp=1 of the same run.
#
# Here (once):  bash ../shared/peers/prepare_lmdeploy.sh .peer && cp ../shared/peers/*.py .peer/
# On the GPU machine (device tool, carry .peer):
#   bash benchmark/run_tensor_parallel.sh                       # llama3-8b, tp 1 2 4
#   TPS="4" bash benchmark/run_tensor_parallel.sh llama3-70b-8l
# PROMPTS / INPUT_LEN / OUTPUT_LEN change the throughput workload. Both benchmarks of a tp use the
# same engine settings, so the batch-1 run loads the throughput run's compiled executables.
source "$(dirname "$0")/device_workload.sh" run_tensor_parallel "$@"
export PYTHONPATH=$PWD
engine=(--max-batch-size 256 --session-len 4096)
for tp in ${TPS:-1 2 4}; do
    python3 benchmark/profile_throughput.py "$model" --tp "$tp" --num-prompts "$prompts" --input-len "$input_len" \
        --output-len "$output_len" "${engine[@]}" 2>&1 | grep -vE 'requests:' | tee -a "$log"
    python3 benchmark/profile_generation.py "$model" --tp "$tp" --batch-sizes 1 --input-lens 128 --output-len 256 \
        "${engine[@]}" 2>&1 | tee -a "$log"
done
python3 benchmark/compare_results.py --by-tp "$log"
