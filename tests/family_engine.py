"""The family tests' engine child (``python family_engine.py SPEC TP OUT``): for each family of the
JSON spec (``{name: {'path', 'prompts', 'cached'}}``), the JAX engine's greedy tokens and the
decoder's last-position logits at tensor parallelism ``TP`` (``family_harness.JaxChildren`` starts
one per tp); a family whose spec has ``'ep'`` runs again with that expert parallelism (its weights
then swapped by ``update_weights`` before the logits), its results under ``'NAME ep=EP'``. It
imports no torch or transformers, so a child starts in a few seconds."""
from __future__ import annotations

import json
import sys

from paged_run import PagedRun
from test_engine_helpers import run_all

from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, TurbomindEngineConfig

NEW_TOKENS, SESSION = 32, 80
KERNELS = {1: 'reference', 2: 'pallas_interpret'}      # tp -> LMDEPLOY_JAX_KERNELS


def _jax_family(path: str, prompts: list[list[int]], cached: list[int], tp: int, ep: int = 1) -> dict:
    """The engine's greedy tokens for ``prompts``, then for ``cached`` (its prefix cache hits), and
    the decoder's last-position logits of ``prompts`` from the model the engine loaded (``ep``:
    ``TurbomindEngineConfig``'s; with ``ep > 1``, from the engine's model after ``update_weights``
    of the same weights in one device's layout)."""
    import os
    from lmdeploy_jax.engine import JaxEngine
    from lmdeploy_jax.models import load_model
    os.environ['LMDEPLOY_JAX_KERNELS'] = KERNELS[tp]        # read when the steps are traced
    source = ModelSource(path, path)
    config = TurbomindEngineConfig(dtype='float32', tp=tp, ep=ep, session_len=SESSION, max_batch_size=4,
                                   cache_block_seq_len=16, num_cache_blocks=28, enable_prefix_caching=True)
    engine = JaxEngine(source, config, decode_batch=[4], prefill_tokens=[64], prefill_batch=[4])
    try:
        gen = GenerationConfig(max_new_tokens=NEW_TOKENS)
        tokens = [r.tokens for r in run_all(engine, [EngineRequest(i, p, gen) for i, p in enumerate(prompts)])]
        cached_tokens = run_all(engine, [EngineRequest(len(prompts), cached, gen)])[0].tokens
        hits = engine._scheduler.blocks.prefix_hit_blocks
        if ep > 1:      # the logits then come from the same weights swapped in from one device's layout
            engine.update_weights(load_model(source, 'float32').params)
        model = engine._runner.model
    finally:
        engine.close()
    logits = PagedRun(model, prompts).step([len(p) for p in prompts], max(map(len, prompts)))
    return dict(tokens=tokens, cached_tokens=cached_tokens, prefix_hit_blocks=hits,
                logits=[row[-1].tolist() for row in logits])


def main(spec_path: str, tp: str, out_path: str) -> None:
    import time
    spec = json.loads(open(spec_path).read())
    out = {}
    for name, f in spec.items():
        for ep in (1, f['ep']) if 'ep' in f else (1,):
            start = time.perf_counter()
            key = name if ep == 1 else f'{name} ep={ep}'
            out[key] = _jax_family(f['path'], f['prompts'], f['cached'], int(tp), ep)
            print(f'{key} tp={tp}: {time.perf_counter() - start:.1f} s', file=sys.stderr)
    with open(out_path, 'w') as fh:
        json.dump(out, fh)


if __name__ == '__main__':
    main(*sys.argv[1:])
