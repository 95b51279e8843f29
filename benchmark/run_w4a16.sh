#!/usr/bin/env bash
# W4A16 (4-bit AWQ weights) against bf16 on one GPU, in one run, on one random-weight model shape:
# the bf16 directory (device_workload.sh) and an AWQ-layout one written from it
# (make_awq_model.py); for each, batch-1 decode (128 in / 256 out) and offline throughput
# (1000 x 512 in / 256 out); then LMDeploy's PyTorch engine on the same AWQ directory (unless
# SKIP_PEER=1); the W4A16 kernel against a bf16 matmul at the shape's projections
# (bench_w4a16.py; unless SKIP_KERNELS=1); and the AWQ figures over the bf16 ones. First (unless
# SKIP_CHECK=1) the engine's greedy tokens with the kernel against the XLA reference on a tiny
# AWQ model (check_w4a16_gpu.py).
#
# Here (once):  bash ../shared/peers/prepare_lmdeploy.sh .peer && cp ../shared/peers/*.py .peer/
# On the GPU machine (device tool, carry .peer):
#   bash benchmark/run_w4a16.sh                    # llama3-8b
#   SKIP_PEER=1 SKIP_KERNELS=1 bash benchmark/run_w4a16.sh llama3-8b
# MODELS (default "bf16 awq") picks the engine runs: MODELS= skips them (a second call on the same
# warm machine then runs the check, the peer and the kernels alone, on the directories kept in /tmp).
source "$(dirname "$0")/device_workload.sh" run_w4a16 "$@"
awq=$model-awq
[ -f "$awq/config.json" ] || python3 benchmark/make_awq_model.py "$model" "$awq" 2>&1 | tail -1 | tee -a "$log"
export PYTHONPATH=$PWD
if [ -z "${SKIP_CHECK:-}" ]; then      # the kernel inside the engine against the XLA reference, tiny shape
    [ -f /tmp/tiny/config.json ] || python3 .peer/make_random_model.py tiny /tmp/tiny > /dev/null 2>&1
    [ -f /tmp/tiny-awq/config.json ] || python3 benchmark/make_awq_model.py /tmp/tiny /tmp/tiny-awq > /dev/null
    python3 benchmark/check_w4a16_gpu.py /tmp/tiny-awq 2>&1 | grep -E 'RESULT|mismatch|Error' | tee -a "$log"
fi
for which in ${MODELS-bf16 awq}; do
    dir=$model; [ "$which" = awq ] && dir=$awq
    python3 benchmark/decode_bytes.py "$dir" --batch 1 2>&1 | grep -E '"(param|chosen)_bytes"' | sed "s|^|$dir |" | tee -a "$log"
    python3 benchmark/profile_generation.py "$dir" --batch-sizes 1 --input-lens 128 --output-len 256 \
        --max-batch-size 256 --session-len 4096 2>&1 | tee -a "$log"
    python3 benchmark/profile_throughput.py "$dir" --num-prompts "$prompts" --input-len "$input_len" \
        --output-len "$output_len" --max-batch-size 256 --session-len 4096 2>&1 | grep -vE 'requests:' | tee -a "$log"
done
if [ -z "${SKIP_PEER:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site .peer/whl/*.whl
    PYTHONPATH=/tmp/peer-site:$PWD/.peer/pkg python3 .peer/lmdeploy_bench.py "$awq" --num-prompts "$prompts" \
        --input-len "$input_len" --output-len "$output_len" 2>&1 | grep -E '^RESULT|Error|error' | tee -a "$log"
fi
[ -n "${SKIP_KERNELS:-}" ] || python3 benchmark/bench_w4a16.py --m 1 16 64 512 4096 2>&1 | tee -a "$log"
python3 - "$log" "$model" "$awq" <<'PY'
import json, sys
log, dense, awq = sys.argv[1:]
rows = [json.loads(line.split('RESULT ', 1)[1]) for line in open(log) if line.startswith('RESULT ')]
def figure(engine, path, bench):
    for r in rows:
        if r['engine'].startswith(engine) and r.get('model', '').rstrip('/') == path and r['bench'] == bench:
            return r['decode_tok_per_s_per_request'] if bench == 'generation' else r['output_tok_per_s']
for bench, label in (('generation', 'batch-1 decode tok/s'), ('throughput', 'throughput output tok/s')):
    ours, base = figure('lmdeploy_jax', awq, bench), figure('lmdeploy_jax', dense, bench)
    ratio = f'{ours / base:.3f} x bf16' if ours and base else 'n/a'
    print(f'{label}: awq {ours}, bf16 {base}: {ratio}')
peer, ours = figure('lmdeploy-', awq, 'throughput'), figure('lmdeploy_jax', awq, 'throughput')
print(f'throughput on the AWQ directory: ours {ours}, LMDeploy {peer}: '
      + (f'{ours / peer:.3f} x' if ours and peer else 'n/a'))
PY
