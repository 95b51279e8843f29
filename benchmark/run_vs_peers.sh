#!/usr/bin/env bash
# vLLM, LMDeploy's PyTorch engine and ours, on one GPU, in one run, on the same random-weight model
# directory and workload: vLLM (vllm_bench.py) first, then run_vs_lmdeploy.sh (LMDeploy and ours), then
# the ShareGPT-length workload on vLLM and ours; prints our ratio to each peer (compare_results.py).
#
# Here (once): run_vs_lmdeploy.sh's preparation, and bash benchmark/prepare_vllm.sh; on the GPU machine,
# the calls of vllm_carry_step.sh (vLLM in /tmp/vllm-site), then in the next call (carry .peer):
#     bash benchmark/run_vs_peers.sh [SHAPE]
# PROMPTS / INPUT_LEN / OUTPUT_LEN change the fixed workload, as in run_vs_lmdeploy.sh; SHAREGPT=0 skips the
# ShareGPT-length workload (lmdeploy_bench.py takes fixed lengths only, so LMDeploy sits that one out).
source "$(dirname "$0")/device_workload.sh" run_vs_peers "$@"
[ -d /tmp/vllm-site/vllm ] || { echo 'no /tmp/vllm-site: run the vllm_carry_step.sh calls first' >&2; exit 2; }
vllm_bench() {
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONPATH=/tmp/vllm-site \
        python3 benchmark/vllm_bench.py "$model" "$@" 2>&1 | grep -E '^RESULT|Error|error' | tee -a "$log"
}
vllm_bench --num-prompts "$prompts" --input-len "$input_len" --output-len "$output_len"
bash benchmark/run_vs_lmdeploy.sh "$shape"
cat "${OUT:-/tmp}/run_vs_lmdeploy.log" >> "$log"
if [ "${SHAREGPT:-1}" != 0 ]; then
    vllm_bench --num-prompts "$prompts" --workload sharegpt
    PYTHONPATH=$PWD python3 benchmark/profile_throughput.py "$model" --num-prompts "$prompts" --workload sharegpt \
        --max-batch-size 256 --session-len 4096 2>&1 | grep -vE 'requests:' | tee -a "$log"
fi
echo "== all engines (ours / peer)"
python3 benchmark/compare_results.py "$log"
