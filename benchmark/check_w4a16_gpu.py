#!/usr/bin/env python3
"""The W4A16 Pallas kernel inside the engine on the GPU: greedy tokens of a 4-bit checkpoint with
the kernels (``LMDEPLOY_JAX_KERNELS=pallas``) against the XLA references (``reference``, whose
tokens the CPU tests check against the PyTorch reference on the dequantized weights), float32,
8 random prompts of make_random_model.py's words, EOS ignored. Prints the first mismatch of each
prompt, one ``RESULT {json}`` line, and exits 1 on any mismatch.

    python benchmark/make_awq_model.py /tmp/tiny /tmp/tiny-awq
    python benchmark/check_w4a16_gpu.py /tmp/tiny-awq [--new-tokens 64] [--tp 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def greedy(path: str, impl: str, prompts: list[str], new_tokens: int, tp: int) -> list[list[int]]:
    os.environ['LMDEPLOY_JAX_KERNELS'] = impl          # read when the steps are traced
    from lmdeploy_jax import GenerationConfig, TurbomindEngineConfig, pipeline
    pipe = pipeline(path, backend_config=TurbomindEngineConfig(dtype='float32', tp=tp, session_len=1024,
                                                               max_batch_size=len(prompts)))
    try:
        gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        return [r.token_ids for r in pipe.batch_infer(prompts, gen_config=gen, do_preprocess=False)]
    finally:
        pipe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model')
    parser.add_argument('--new-tokens', type=int, default=64)
    parser.add_argument('--tp', type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)       # make_random_model.py's word-level tokenizer: w0 .. w7999
    prompts = [' '.join(f'w{i}' for i in rng.integers(0, 8000, n)) for n in (5, 17, 64, 130, 9, 33, 250, 1)]
    want = greedy(args.model, 'reference', prompts, args.new_tokens, args.tp)
    got = greedy(args.model, 'pallas', prompts, args.new_tokens, args.tp)
    mismatches = 0
    for i, (a, b) in enumerate(zip(want, got)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is not None or len(a) != len(b):
            mismatches += 1
            start = first or 0
            print(f'prompt {i}: first mismatch at token {first}: reference {a[start:start + 4]}, '
                  f'pallas {b[start:start + 4]}')
    print('RESULT ' + json.dumps(dict(bench='w4a16_greedy', model=args.model, tp=args.tp, prompts=len(prompts),
                                      new_tokens=args.new_tokens, mismatched_prompts=mismatches)))
    sys.exit(1 if mismatches else 0)


if __name__ == '__main__':
    main()
