#!/usr/bin/env bash
# The per-executable XLA options on one GPU (issue 23: the engine no longer writes XLA_FLAGS): the
# options in effect of every step executable of llama3-8b (random weights) at tp=1, which must
# include xla_gpu_enable_dynamic_slice_fusion=true and xla_gpu_enable_triton_gemm=false, and the
# batch-1 decode speed; then the throughput workload. Compare with the same script's figures on
# the previous main (e.g. git worktree of c978c06, run in the same call).
#
# On the GPU machine (device tool, carry .peer), from the repository root:
#     bash benchmark/check_step_options_gpu.sh [SHAPE]      # PROMPTS=... INPUT_LEN=... OUTPUT_LEN=...
source "$(dirname "$0")/device_workload.sh" check_step_options_gpu "$@"
export PYTHONPATH=$PWD
python3 benchmark/executable_report.py "$model" --max-batch-size 4 --session-len 1024 --batch-1-tokens 256 2>&1 |
    grep -E '^RESULT|Error' | cut -c1-600 | tee -a "$log"
python3 - "$log" <<'PY' 2>&1 | tee -a "$log"
import json, sys
records = [json.loads(line[7:]) for line in open(sys.argv[1]) if line.startswith('RESULT {"bench": "executable"')]
bad = [(r['kind'], r['rows'], r['tokens']) for r in records
       if r['xla_options'].get('xla_gpu_enable_dynamic_slice_fusion') != 'true'
       or r['xla_options'].get('xla_gpu_enable_triton_gemm') != 'false']
print(f'{len(records)} executables; without the step options: {bad or "none"}')
PY
python3 benchmark/profile_throughput.py "$model" --num-prompts "$prompts" --input-len "$input_len" \
    --output-len "$output_len" 2>&1 | grep -E '^RESULT|Error' | cut -c1-600 | tee -a "$log"
