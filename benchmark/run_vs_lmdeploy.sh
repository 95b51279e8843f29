#!/usr/bin/env bash
# LMDeploy's PyTorch engine and ours, on one GPU, in one run, on the same random-weight model
# directory and workload; prints both figures and their ratio.
#
# Here (once):  bash ../shared/peers/prepare_lmdeploy.sh .peer && cp ../shared/peers/*.py .peer/
# On the GPU machine (device tool, carry .peer):  bash benchmark/run_vs_lmdeploy.sh [SHAPE]
# SKIP_PEER=1 runs ours only; PROMPTS / INPUT_LEN / OUTPUT_LEN change the workload; QUANT_POLICY=8|4
# quantizes our KV cache (lmdeploy_bench.py has no such flag: the peer keeps its KV cache unquantized).
source "$(dirname "$0")/device_workload.sh" run_vs_lmdeploy "$@"
if [ -z "${SKIP_PEER:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site .peer/whl/*.whl
    PYTHONPATH=/tmp/peer-site:$PWD/.peer/pkg python3 .peer/lmdeploy_bench.py "$model" --num-prompts "$prompts" \
        --input-len "$input_len" --output-len "$output_len" 2>&1 | grep -E '^RESULT|Error|error' | tee -a "$log"
fi
PYTHONPATH=$PWD python3 benchmark/profile_throughput.py "$model" --num-prompts "$prompts" --input-len "$input_len" \
    --output-len "$output_len" --max-batch-size 256 --session-len 4096 --quant-policy "${QUANT_POLICY:-0}" 2>&1 \
    | grep -vE 'requests:' | tee -a "$log"
PYTHONPATH=$PWD python3 benchmark/profile_generation.py "$model" --batch-sizes 1 --input-lens 128 \
    --output-len 256 --max-batch-size 256 --session-len 4096 --quant-policy "${QUANT_POLICY:-0}" 2>&1 | tee -a "$log"
python3 benchmark/compare_results.py "$log"
