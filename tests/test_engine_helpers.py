"""Shared by the JAX engine tests (no tests here): run requests through an InferenceEngine and wait."""
from __future__ import annotations

import threading

from lmdeploy_jax.engine_api import EngineRequest

TIMEOUT = 300


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
