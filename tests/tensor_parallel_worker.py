"""Run by ``test_tensor_parallel.py`` in a fresh process (its own ``XLA_FLAGS`` device count, or
one process of a ``jax.distributed`` group): greedy tokens of the JAX engine for each ``--tp``,
printed as one JSON line ``{"tp": [[tokens of each prompt], ...], ...}`` (process 0 only).

With ``--sequential`` requests go one at a time, so that every process of a group schedules the
same steps (each runs its own scheduler over the same requests). With ``--swap-weights OTHER`` each
engine serves the prompts three times: on ``--model``'s weights, on OTHER's, then on ``--model``'s
again, each swap by ``update_weights`` of the parameters in one device's layout (``load_model``'s
without a mesh); its entry is then the three rounds' token lists. The engines of the tps given to
``--mixed-chunk`` run mixed steps (``enable_mixed_chunk``) and check that some step mixed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine.engine import JaxEngine
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, TurbomindEngineConfig
from lmdeploy_jax.models import load_model
from test_engine_helpers import run_all


def serve(engine: JaxEngine, prompts: list[list[int]], new_tokens: int, sequential: bool,
          first_id: int = 0) -> list[list[int]]:
    """Each prompt's greedy tokens (sessions ``first_id``, ``first_id + 1``, ...)."""
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    requests = [EngineRequest(first_id + i, p, gen) for i, p in enumerate(prompts)]
    if sequential:
        results = [run_all(engine, [r])[0] for r in requests]
    else:
        results = run_all(engine, requests)
    assert all(r.finish_reason == 'length' for r in results), [(r.finish_reason, r.error) for r in results]
    return [r.tokens for r in results]


def greedy_tokens(model: str | None, tp: int, prompts: list[list[int]], new_tokens: int,
                  sequential: bool, quant_policy: int = 0, states: str | None = None,
                  swap_weights: str | None = None, mixed_chunk: bool = False, **nodes) -> list:
    """``nodes``: ``TurbomindEngineConfig``'s nnodes, node_rank and dist_init_addr. ``states``: a
    directory where the engine's ``token_states`` of the first prompt go, as ``tp{tp}.npz``.
    ``swap_weights``: the other checkpoint of ``--swap-weights`` (then three rounds of tokens).
    ``mixed_chunk``: the engine runs mixed steps; AssertionError if none ran."""
    config = TurbomindEngineConfig(dtype='float32', tp=tp, session_len=128, max_batch_size=4,
                                   num_cache_blocks=24, cache_block_seq_len=16, max_prefill_token_num=128,
                                   quant_policy=quant_policy, enable_mixed_chunk=mixed_chunk, **nodes)
    engine = JaxEngine(resolve_model(model), config, decode_batch=[4], prefill_tokens=[32], prefill_batch=[4])
    try:
        tokens = serve(engine, prompts, new_tokens, sequential)
        if swap_weights is not None:
            rounds = [tokens]
            for path in (swap_weights, model):
                engine.update_weights(load_model(resolve_model(path), 'float32').params)
                rounds.append(serve(engine, prompts, new_tokens, sequential, len(rounds) * len(prompts)))
            tokens = rounds
        assert not mixed_chunk or engine.stats()['mixed_steps'] > 0, 'no mixed step ran'
        if states is not None:
            logits, hidden = engine.token_states(prompts[:1])[0]
            np.savez(os.path.join(states, f'tp{tp}.npz'), logits=logits, hidden=hidden)
    finally:
        engine.close()
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default=None, help='checkpoint directory (default: the default model)')
    parser.add_argument('--tp', type=int, nargs='+', required=True)
    parser.add_argument('--new-tokens', type=int, default=6)
    parser.add_argument('--sequential', action='store_true')
    parser.add_argument('--quant-policy', type=int, default=0)
    parser.add_argument('--nnodes', type=int, default=1)
    parser.add_argument('--node-rank', type=int, default=0)
    parser.add_argument('--dist-init-addr', default=None)
    parser.add_argument('--states', default=None, help='directory for each tp\'s token_states of the first prompt')
    parser.add_argument('--swap-weights', default=None, help='checkpoint whose weights each engine swaps in and out')
    parser.add_argument('--mixed-chunk', type=int, nargs='*', default=[], metavar='TP',
                        help='the tps whose engines run mixed steps')
    args = parser.parse_args()
    nodes = dict(nnodes=args.nnodes, node_rank=args.node_rank, dist_init_addr=args.dist_init_addr)
    vocab = 1000
    # one prompt longer than a prefill chunk (two chunks), one a block long, one short
    prompts = [[(7 * i + 3) % vocab for i in range(45)], [(11 * i + 5) % vocab for i in range(16)], [1, 2, 3]]
    out = {}
    for tp in args.tp:
        start = time.perf_counter()
        out[tp] = greedy_tokens(args.model, tp, prompts, args.new_tokens, args.sequential, args.quant_policy,
                                args.states, args.swap_weights, tp in args.mixed_chunk, **nodes)
        print(f'tp={tp}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
    if jax.process_index() == 0:
        print(json.dumps(out))


if __name__ == '__main__':
    main()
