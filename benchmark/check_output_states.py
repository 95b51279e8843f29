#!/usr/bin/env python3
"""``output_logits`` / ``output_last_hidden_state`` of the JAX engine against the PyTorch reference,
on any device and at any ``--tp`` (float32 default).

    python benchmark/check_output_states.py [MODEL] --tp 2 --new-tokens 32

The JAX engine answers the 8 prompts of ``check_greedy_vs_reference.py`` (greedy, EOS ignored)
with ``output_logits='all'`` and ``output_last_hidden_state='generation'``; the reference backend
runs transformers over each prompt and answer. Per prompt: the largest difference of the logits
and of the hidden states, relative to the reference's largest magnitude, and whether each
generated token is the argmax of its logits row. Also the seconds of the same batch without the
outputs. Prints one ``RESULT {json}`` line; exits 1 when a difference is over ``--tolerance`` or
a token is not its row's argmax.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from check_greedy_vs_reference import PROMPTS


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model_path', nargs='?', default=None)
    parser.add_argument('--dtype', default='float32')
    parser.add_argument('--tp', type=int, default=1)
    parser.add_argument('--new-tokens', type=int, default=32)
    parser.add_argument('--tolerance', type=float, default=1e-3)
    args = parser.parse_args()

    from lmdeploy_jax import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig, pipeline
    plain = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    asked = plain.replace(output_logits='all', output_last_hidden_state='generation')
    with pipeline(args.model_path, backend_config=TurbomindEngineConfig(dtype=args.dtype, tp=args.tp,
                                                                         session_len=2048)) as pipe:
        pipe(PROMPTS, gen_config=asked)          # compiles the pass's chunk shapes
        seconds = {}
        for name, config in (('plain', plain), ('with_outputs', asked)):
            start = time.perf_counter()
            responses = pipe(PROMPTS, gen_config=config)
            seconds[name] = round(time.perf_counter() - start, 3)
        prompt_ids = [pipe.tokenizer.encode(pipe.chat_template.messages2prompt(p)) for p in PROMPTS]
    with pipeline(args.model_path, backend='pytorch', backend_config=PytorchEngineConfig(dtype=args.dtype,
                                                                                          session_len=2048)) as ref:
        states = ref.engine.token_states([ids + r.token_ids for ids, r in zip(prompt_ids, responses)])
    logits_errors, hidden_errors, not_argmax = [], [], 0
    for ids, resp, (logits, hidden) in zip(prompt_ids, responses, states):
        logits_errors.append(relative_error(resp.logits, logits[:-1]))
        hidden_errors.append(relative_error(resp.last_hidden_state, hidden[len(ids) - 1:-1]))
        not_argmax += int((resp.logits[len(ids) - 1:].argmax(-1) != np.asarray(resp.token_ids)).sum())
    import jax
    result = dict(bench='output_states', dtype=args.dtype, tp=args.tp, prompts=len(PROMPTS),
                  new_tokens=args.new_tokens, max_logits_error=max(logits_errors),
                  max_hidden_error=max(hidden_errors), tokens_not_argmax=not_argmax, seconds=seconds,
                  jax_device=str(jax.devices()[0].device_kind))
    print('RESULT ' + json.dumps(result))
    return 0 if max(logits_errors + hidden_errors) <= args.tolerance and not not_argmax else 1


if __name__ == '__main__':
    sys.exit(main())
