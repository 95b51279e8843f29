#!/usr/bin/env bash
# `lmdeploy_jax lite auto_awq --search-scale` on one GPU on a random-weight model of a real shape
# (default llama3-8b, bf16, made by .peer/make_random_model.py through device_workload.sh): that
# the layer-by-layer quantization fits one GPU, its time and the device's peak memory, LMDeploy's
# default calibration size (128 x 2048 tokens of a text of the random model's words w0..w7999),
# and that the JAX engine then loads the checkpoint and generates. The random model's perplexity means nothing;
# the quality check is tests/test_lite_auto_awq.py on the real default model.
#
# On the GPU machine (device tool, carry .peer and .whl):
#   bash benchmark/run_lite_auto_awq.sh                       # llama3-8b
#   SAMPLES=32 SEQLEN=512 bash benchmark/run_lite_auto_awq.sh llama3-8b
source "$(dirname "$0")/device_workload.sh" run_lite_auto_awq "$@"
export PYTHONPATH=$PWD:$PWD/benchmark
out=$model-lite-awq
rm -rf "$out"
calib=/tmp/lite_auto_awq_words.txt
python3 -c "import random; random.seed(0); print(' '.join(f'w{random.randrange(8000)}' for _ in range(300000)))" > "$calib"
python3 - "$model" "$out" "$calib" "${SAMPLES:-128}" "${SEQLEN:-2048}" "${BATCH:-4}" <<'PY' 2>&1 | tee -a "$log"
import json, sys, time
from lmdeploy_jax.lite import auto_awq
from bench_common import device_description, peak_device_bytes
model, out, calib, samples, seqlen, batch = *sys.argv[1:4], *map(int, sys.argv[4:])
start = time.perf_counter()
auto_awq(model, out, calib_dataset=calib, calib_samples=samples, calib_seqlen=seqlen,
         batch_size=batch, search_scale=True)
print('RESULT ' + json.dumps({'op': 'lite_auto_awq', 'model': model, 'device': device_description(),
                              'calib_samples': samples, 'calib_seqlen': seqlen, 'batch_size': batch,
                              'seconds': round(time.perf_counter() - start, 1),
                              'peak_device_gib': round((peak_device_bytes() or 0) / 2**30, 2)}))
PY
python3 - "$out" <<'PY' 2>&1 | tail -3 | tee -a "$log"
import sys
from lmdeploy_jax import GenerationConfig, pipeline
with pipeline(sys.argv[1]) as pipe:
    resp = pipe('w1 w2 w3', gen_config=GenerationConfig(max_new_tokens=16, ignore_eos=True))
print('RESULT generated', resp.generate_token_len, 'tokens from the AWQ checkpoint')
PY
