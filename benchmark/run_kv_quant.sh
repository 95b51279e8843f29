#!/usr/bin/env bash
# KV cache quantization on one GPU, in one run: for each quant_policy (0, 8, 4), offline
# throughput of a long-context workload on one random-weight model, and the tokens its KV pool
# holds (same cache_max_entry_count); then each policy against quant_policy=0 of the same run.
#
# Here (once):  bash ../shared/peers/prepare_lmdeploy.sh .peer && cp ../shared/peers/*.py .peer/
# On the GPU machine (device tool, carry .peer):
#   bash benchmark/run_kv_quant.sh                              # llama3-8b, 500 x 2048 in / 512 out
#   QUANT_POLICIES="0 8" PROMPTS=200 bash benchmark/run_kv_quant.sh qwen3-8b
PROMPTS=${PROMPTS:-500} INPUT_LEN=${INPUT_LEN:-2048} OUTPUT_LEN=${OUTPUT_LEN:-512}
source "$(dirname "$0")/device_workload.sh" run_kv_quant "$@"
export PYTHONPATH=$PWD
for policy in ${QUANT_POLICIES:-0 8 4}; do
    python3 benchmark/profile_throughput.py "$model" --quant-policy "$policy" --num-prompts "$prompts" \
        --input-len "$input_len" --output-len "$output_len" --max-batch-size 256 --session-len 4096 \
        --log-level INFO 2>&1 | grep -E 'KV pool|RESULT|req/s|Error|error' | tee -a "$log"
done
python3 benchmark/compare_results.py --by-quant "$log"
