#!/usr/bin/env python3
"""Host time of the JAX engine's decode loop, without a model: what the device waits for per step.

Runs the real scheduler on ``--batch`` decoding requests and, per decode call, times planning
(``Scheduler.schedule``), building the call's host arrays (``host_decode_batch`` and
``host_sampling_params``, as ``ModelRunner.step`` does) and taking its results
(``Scheduler.complete``, fed random tokens). Prints one JSON line: microseconds per call and per
decode step (a call runs ``--decode-steps`` steps), medians over the calls. Device transfers and
dispatch are not counted.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lmdeploy_jax.engine.block_manager import BlockManager
from lmdeploy_jax.engine.buckets import make_buckets
from lmdeploy_jax.engine.multistep import host_decode_batch
from lmdeploy_jax.engine.sampler import MAX_LOGPROBS, SampleOutput, host_sampling_params
from lmdeploy_jax.engine.scheduler import Scheduler
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig


def fake_output(rng, shape, vocab):
    return SampleOutput(rng.integers(10, vocab, shape).astype(np.int32), np.zeros(shape, np.float32),
                        np.zeros(shape + (MAX_LOGPROBS,), np.float32), np.zeros(shape + (MAX_LOGPROBS,), np.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--decode-steps', type=int, default=8)
    ap.add_argument('--prompt', type=int, default=512)
    ap.add_argument('--session-len', type=int, default=4096)
    ap.add_argument('--block-size', type=int, default=64)
    ap.add_argument('--vocab', type=int, default=128256)
    ap.add_argument('--calls', type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bs, k = args.block_size, args.decode_steps
    buckets = make_buckets(args.batch, 8192, args.session_len, bs)
    blocks = args.batch * -(-args.session_len // bs) + 1
    sched = Scheduler(BlockManager(blocks, bs, True), buckets, args.session_len, args.batch, args.vocab, k)
    for i in range(args.batch):
        sched.submit(EngineRequest(i, rng.integers(0, args.vocab, args.prompt).tolist(),
                                   GenerationConfig(max_new_tokens=10**6)), lambda out: None)
    while True:                                    # prefill (and early decode calls) until all decode
        plan = sched.schedule()
        if not plan.prefill and len(plan.rows) == args.batch:
            sched.complete(plan, fake_output(rng, (plan.steps, plan.shape[0]), args.vocab))
            break
        sched.complete(plan, fake_output(rng, (plan.steps, plan.shape[0]) if not plan.prefill
                                         else (plan.shape[0],), args.vocab))
    times = {'schedule': [], 'build': [], 'complete': []}
    for _ in range(args.calls):
        t0 = time.perf_counter()
        plan = sched.schedule()
        t1 = time.perf_counter()
        seqs = [seq for seq, _, _ in plan.rows]
        host_decode_batch(seqs, plan.shape[0], buckets.max_blocks, bs)
        host_sampling_params([(s.gen_config, s.seed, s.num_generated) for s in seqs], plan.shape[0])
        t2 = time.perf_counter()
        out = fake_output(rng, (plan.steps, plan.shape[0]), args.vocab)   # not timed
        t3 = time.perf_counter()
        sched.complete(plan, out)
        t4 = time.perf_counter()
        times['schedule'].append(t1 - t0)
        times['build'].append(t2 - t1)
        times['complete'].append(t4 - t3)
    # medians: robust to other processes sharing the cores
    per_call = {name: round(float(np.median(t)) * 1e6) for name, t in times.items()}
    total = sum(per_call.values())
    print(json.dumps({'batch': len(plan.rows), 'decode_steps': k, 'us_per_call': per_call,
                      'us_per_call_total': round(total), 'us_per_decode_step': round(total / k)}))


if __name__ == '__main__':
    main()
