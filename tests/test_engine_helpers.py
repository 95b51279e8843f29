"""Shared by the JAX engine tests (no tests here): run requests through an InferenceEngine and wait."""
from __future__ import annotations

import threading

from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import TurbomindEngineConfig

TIMEOUT = 300


def small_default_engine(source, **changes):
    """A float32 JaxEngine over ``source`` (the default model) with one decode bucket and prefill
    chunks of 64 tokens for 1, 4 or 8 rows, the configuration several test modules share, so their
    compiled steps are cached once. A prompt that arrives alone is prefilled as one row, not padded
    to eight. ``changes``: config fields that leave the compiled steps as they are (e.g.
    ``enable_prefix_caching``)."""
    from lmdeploy_jax.engine import JaxEngine
    config = TurbomindEngineConfig(dtype='float32', session_len=256, max_batch_size=8, num_cache_blocks=40,
                                   max_prefill_token_num=512, **changes)
    return JaxEngine(source, config, decode_batch=[8], prefill_tokens=[64], prefill_batch=[1, 4, 8])


def default_model_pipeline():
    """A JAX-engine pipeline over the default model, every setting at its default but
    ``session_len``, which is the server tests' (``test_server.SESSION_LEN``): the CPU default of
    8192 tokens compiles every step with more block-table widths to choose among
    (``pallas_kernels._dense.context_widths``), and the server tests' length gives their compiled
    steps, which the JAX compilation cache then holds. The caller closes it (a context manager)."""
    from test_server import SESSION_LEN

    from lmdeploy_jax import pipeline
    return pipeline(backend_config=TurbomindEngineConfig(session_len=SESSION_LEN))


class Result:
    """Collects one request's outputs; ``wait`` blocks until its last one."""

    def __init__(self):
        self.tokens, self.logprobs, self.outputs = [], [], []
        self.finish_reason = self.error = None
        self.done = threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        self.tokens += out.token_ids
        self.logprobs += out.logprobs or []
        if out.finish_reason is not None:
            self.finish_reason, self.error = out.finish_reason, out.error
            self.done.set()

    def wait(self):
        assert self.done.wait(TIMEOUT), 'the request did not finish'
        return self


def run_all(engine, requests: list[EngineRequest]) -> list[Result]:
    results = [Result() for _ in requests]
    for req, res in zip(requests, results):
        engine.submit(req, res)
    return [r.wait() for r in results]
