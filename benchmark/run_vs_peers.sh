#!/usr/bin/env bash
# vLLM, LMDeploy's PyTorch engine and ours, on one GPU, in one run, on the same random-weight model
# directory and workload: vLLM (vllm_bench.py) first, then run_vs_lmdeploy.sh (LMDeploy and ours), then
# the ShareGPT-length workload on vLLM and ours; prints our ratio to each peer (compare_results.py).
#
# Here (once): run_vs_lmdeploy.sh's preparation, and bash benchmark/prepare_vllm.sh; on the GPU machine,
# the calls of vllm_carry_step.sh (vLLM in /tmp/vllm-site), then in the next call (carry .peer):
#     bash benchmark/run_vs_peers.sh [SHAPE]
# PROMPTS / INPUT_LEN / OUTPUT_LEN change the fixed workload, as in run_vs_lmdeploy.sh; SHAREGPT=0 skips the
# ShareGPT-length workload (lmdeploy_bench.py takes fixed lengths only, so LMDeploy sits that one out);
# RATES="4 16 64" adds the serving benchmark (below) of vLLM's server and ours (SERVE_PROMPTS each).
source "$(dirname "$0")/device_workload.sh" run_vs_peers "$@"
[ -d /tmp/vllm-site/vllm ] || { echo 'no /tmp/vllm-site: run the vllm_carry_step.sh calls first' >&2; exit 2; }
# vLLM's environment: offline; FlashInfer's top-k/top-p sampler off, since FlashInfer is not carried
# (prepare_vllm.sh) and vLLM imports it for that sampler unless told not to; greedy decoding never
# runs that sampler, so the figures are those of vLLM's defaults.
vllm_env=(env HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
          PYTHONPATH=/tmp/vllm-site)
vllm_bench() {
    "${vllm_env[@]}" python3 benchmark/vllm_bench.py "$model" "$@" 2>&1 | grep -E '^RESULT|Error|error' \
        | tee -a "$log"
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

# Serving (RATES="4 16 64" turns it on): each server in turn on the ShareGPT-length workload, Poisson
# arrivals at every rate of RATES (SERVE_PROMPTS requests each) over HTTP; p99 TTFT and TPOT per rate.
serve_and_load() {   # NAME PORT COMMAND...: start the server, wait for /health, load it, stop it
    local name=$1 port=$2
    shift 2
    "$@" > "${OUT:-/tmp}/serve_$name.log" 2>&1 &
    local pid=$!
    if python3 -c "
import os, sys, time, urllib.request
for _ in range(900):
    try:
        if urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    if not os.path.exists('/proc/$pid'):
        break
    time.sleep(1)
sys.exit('the $name server did not answer /health')"; then
        python3 benchmark/profile_restful_api.py --base-url "http://127.0.0.1:$port" --endpoint completions \
            --engine "$name" --request-rate $RATES --num-prompts "${SERVE_PROMPTS:-200}" --workload sharegpt \
            --ignore-eos | sed 's/^/SERVING /' | tee -a "$log"
    else
        tail -20 "${OUT:-/tmp}/serve_$name.log"
    fi
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
}
if [ -n "${RATES:-}" ]; then
    serve_and_load vllm 8000 "${vllm_env[@]}" python3 -m vllm.entrypoints.cli.main serve "$model" --port 8000
    serve_and_load lmdeploy_jax 23333 env PYTHONPATH="$PWD" python3 -m lmdeploy_jax.cli.main serve api_server \
        "$model" --server-name 127.0.0.1 --server-port 23333 --max-batch-size 256 --session-len 4096
    echo "== serving (p99; ours / vLLM under 1: ours lower)"
    python3 benchmark/compare_results.py --serving "$log"
fi
