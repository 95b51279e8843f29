#!/usr/bin/env bash
# vLLM, LMDeploy's PyTorch engine and ours on one GPU, on the same random-weight model directory and
# workloads; prints our ratio to each peer (compare_results.py). PARTS picks what this call runs, in
# this order (default: all but serving; serving too when RATES is set):
#   vllm      vllm_bench.py: the fixed workload and the ShareGPT-length one on one engine, and batch 1
#   lmdeploy  run_vs_lmdeploy.sh: LMDeploy and ours on the fixed workload, and batch 1
#   sharegpt  ours on the ShareGPT-length workload (lmdeploy_bench.py takes fixed lengths only)
#   serving   vllm serve, then our server: Poisson arrivals at each of RATES req/s (SERVE_PROMPTS
#             ShareGPT-length requests each) over HTTP; p99 TTFT and TPOT per rate
# A device command stops at 10 minutes, so split the parts over consecutive calls of one warm machine
# (the model directory and /tmp/vllm-site stay in its /tmp) and compare their logs together here:
#     python3 benchmark/compare_results.py LOG1 LOG2 ...; python3 benchmark/compare_results.py --serving LOG...
#
# Here (once): run_vs_lmdeploy.sh's preparation, and bash benchmark/prepare_vllm.sh; on the GPU machine,
# the calls of vllm_carry_step.sh (vLLM into /tmp/vllm-site), then (carry .peer and .whl):
#     PARTS=vllm bash benchmark/run_vs_peers.sh [SHAPE]; PARTS="lmdeploy sharegpt" bash ...
#     RATES="4 16 64" PARTS=serving bash benchmark/run_vs_peers.sh [SHAPE]
# PROMPTS / INPUT_LEN / OUTPUT_LEN change the fixed workload, as in run_vs_lmdeploy.sh.
source "$(dirname "$0")/device_workload.sh" run_vs_peers "$@"
parts=" ${PARTS:-vllm lmdeploy sharegpt${RATES:+ serving}} "
# vLLM's environment: offline; FlashInfer's top-k/top-p sampler off, since FlashInfer is not carried
# (prepare_vllm.sh) and vLLM imports it for that sampler unless told not to; greedy decoding never
# runs that sampler, so the figures are those of vLLM's defaults.
vllm_env=(env HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_USE_FLASHINFER_SAMPLER=0
          PYTHONPATH=/tmp/vllm-site)
if [[ $parts == *" vllm "* || $parts == *" serving "* ]] && [ ! -d /tmp/vllm-site/vllm ]; then
    echo 'no /tmp/vllm-site: run the vllm_carry_step.sh calls first' >&2
    exit 2
fi

if [[ $parts == *" vllm "* ]]; then
    "${vllm_env[@]}" python3 benchmark/vllm_bench.py "$model" --num-prompts "$prompts" --input-len "$input_len" \
        --output-len "$output_len" --workload fixed sharegpt 2>&1 | grep -E '^RESULT|Error|error' | tee -a "$log"
fi
if [[ $parts == *" lmdeploy "* ]]; then
    bash benchmark/run_vs_lmdeploy.sh "$shape"
    cat "${OUT:-/tmp}/run_vs_lmdeploy.log" >> "$log"
fi
if [[ $parts == *" sharegpt "* ]]; then
    PYTHONPATH=$PWD python3 benchmark/profile_throughput.py "$model" --num-prompts "$prompts" --workload sharegpt \
        --max-batch-size 256 --session-len 4096 2>&1 | grep -vE 'requests:' | tee -a "$log"
fi

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
            --engine "$name" --request-rate ${RATES:?serving needs RATES} --num-prompts "${SERVE_PROMPTS:-200}" \
            --workload sharegpt --ignore-eos --warmup 16 | sed 's/^/SERVING /' | tee -a "$log"
    else
        tail -20 "${OUT:-/tmp}/serve_$name.log"
    fi
    stop_tree "$pid"
    wait "$pid" 2>/dev/null
}
stop_tree() {   # PID: SIGTERM to it, then wait (60 s at most, then SIGKILL) until it and every process
                # under it (vLLM's engine core) are gone, so that the next server finds the GPU's memory free
    python3 - "$1" <<'PY'
import os, signal, sys, time
def children(pid):
    try:
        return [int(c) for t in os.listdir(f'/proc/{pid}/task')
                for c in open(f'/proc/{pid}/task/{t}/children').read().split()]
    except OSError:
        return []
def alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False
tree, todo = [], [int(sys.argv[1])]
while todo:
    tree.append(todo.pop())
    todo += children(tree[-1])
os.kill(tree[0], signal.SIGTERM)
deadline = time.time() + 60
while any(map(alive, tree)) and time.time() < deadline:
    time.sleep(1)
for pid in filter(alive, tree):
    os.kill(pid, signal.SIGKILL)
PY
}
if [[ $parts == *" serving "* ]]; then
    serve_and_load vllm 8000 "${vllm_env[@]}" python3 -m vllm.entrypoints.cli.main serve "$model" --port 8000
    serve_and_load lmdeploy_jax 23333 env PYTHONPATH="$PWD" python3 -m lmdeploy_jax.cli.main serve api_server \
        "$model" --server-name 127.0.0.1 --server-port 23333 --max-batch-size 256 --session-len 4096
    echo "== serving (p99; ours / vLLM under 1: ours lower)"
    python3 benchmark/compare_results.py --serving "$log"
fi
echo "== this call's engines (ours / peer)"
python3 benchmark/compare_results.py "$log"
