#!/usr/bin/env python3
"""Greedy tokens of the JAX engine against the PyTorch reference, on any device (float32 default).

    python benchmark/check_greedy_vs_reference.py [MODEL] --new-tokens 64

Both backends load the same weights and run the same 8 prompts (chat template applied, EOS
ignored so every prompt runs the full length); prints the first mismatch of each prompt, one
``RESULT {json}`` line, and exits 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import json
import sys

PROMPTS = [
    'What is the capital of France?',
    'Write a haiku about the sea.',
    'Explain what a hash table is in two sentences.',
    'List three prime numbers.',
    'Translate "good morning" into Spanish.',
    'Why is the sky blue?',
    'Give me a short recipe for pancakes.',
    'What is 12 times 7?',
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model_path', nargs='?', default=None)
    parser.add_argument('--dtype', default='float32')
    parser.add_argument('--new-tokens', type=int, default=64)
    args = parser.parse_args()

    from lmdeploy_jax import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline
    config = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    results = {}
    for backend, engine_config in (('turbomind', TurbomindEngineConfig(dtype=args.dtype, session_len=2048)),
                                   ('pytorch', PytorchEngineConfig(dtype=args.dtype, session_len=2048))):
        with pipeline(args.model_path, backend=backend, backend_config=engine_config) as pipe:
            results[backend] = [r.token_ids for r in pipe(PROMPTS, gen_config=config)]
            if backend == 'pytorch':
                device = str(next(pipe.engine.model.parameters()).device)
    mismatches = 0
    for prompt, ours, ref in zip(PROMPTS, results['turbomind'], results['pytorch']):
        if ours != ref:
            mismatches += 1
            at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            print(f'MISMATCH {prompt!r} at token {at}: ours {ours[at:at + 5]} reference {ref[at:at + 5]}')
    import jax
    print('RESULT ' + json.dumps(dict(bench='greedy_vs_reference', dtype=args.dtype, prompts=len(PROMPTS),
                                      new_tokens=args.new_tokens, mismatched_prompts=mismatches,
                                      jax_device=str(jax.devices()[0].device_kind), reference_device=device)))
    return 1 if mismatches else 0


if __name__ == '__main__':
    sys.exit(main())
