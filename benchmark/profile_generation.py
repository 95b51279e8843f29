#!/usr/bin/env python3
"""Latency across batch sizes and context lengths (LMDeploy's profile_generation).

    python benchmark/profile_generation.py /tmp/llama3-8b --batch-sizes 1 16 64 256 --input-lens 128 2048
    python benchmark/profile_generation.py --batch-sizes 1 4 --input-lens 16 --output-len 8      # CPU smoke run
    python benchmark/profile_generation.py /tmp/llama3-8b --tp 2 --batch-sizes 1 --do-sample    # sampled decode
    python benchmark/profile_generation.py /tmp/llama3-8b --batch-sizes 1 --input-lens 128 \
        --output-len 256                # batch 1; on a GPU the read bandwidth is measured first (--read-bandwidth)

For each (batch size, input length): first-token latency, decode tok/s per request and in total,
and peak device memory; one ``RESULT {json}`` line each.

With the JAX engine, each record also carries the bytes a decode step must read (``read_fields``:
the weights a step reads and the KV of its rows' contexts, averaged over the decode) and the
bandwidth they imply at the measured decode rate. With ``--read-bandwidth`` (the default when JAX
runs on a GPU), the card's read bandwidth is measured first, in the same process
(``read_bandwidth.py``), and each record carries it and the run's ratio to it.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench_common import (add_engine_args, build_pipeline, device_description, peak_device_bytes, percentiles,
                          print_result, random_prompt_ids, run_requests)


def measure_generation(pipe, rng: np.random.Generator, batch: int, input_len: int, output_len: int,
                       do_sample: bool = False) -> dict:
    """``batch`` random prompts of ``input_len`` tokens at once, ``output_len`` tokens each (after
    one warm-up request): first-token latency, decode tok/s per request and in total."""
    vocab = pipe.tokenizer.vocab_size
    requests = [(random_prompt_ids(rng, vocab, input_len), output_len) for _ in range(batch)]
    run_requests(pipe, requests[:1], progress=False, session_base=10_000_000, do_sample=do_sample)   # warm path
    timings, seconds = run_requests(pipe, requests, progress=False, do_sample=do_sample)
    per_request = [(t.output_len - 1) / max(t.end - t.first_token, 1e-9) for t in timings]
    return dict(first_token_ms=percentiles([t.ttft for t in timings]),
                decode_tok_per_s_per_request=round(float(np.mean(per_request)), 1),
                total_tok_per_s=round(sum(t.output_len for t in timings) / seconds, 1))


def read_fields(spec, batch: int, input_len: int, output_len: int, quant_policy: int, steps_per_s: float,
                read_tbps: float | None = None, tp: int = 1) -> dict:
    """A generation record's read-bandwidth fields, for ``batch`` rows decoding in lockstep at
    ``steps_per_s`` decode steps a second (each row's decode tok/s). The decode step that makes a
    row's token ``j`` (2 .. ``output_len``; the first comes from the prefill) attends
    ``input_len + j - 1`` keys: ``step_kv_bytes`` is the mean over those steps of the rows' KV
    bytes (``decode_bytes.kv_read_bytes``; a float), ``step_weight_bytes`` the weights a step of ``batch``
    tokens reads (``decode_bytes.weight_bytes``' chosen bytes), ``step_read_bytes`` their sum and
    ``implied_read_tbps`` that sum times ``steps_per_s``. With ``read_tbps`` (one device's
    measured read bandwidth): ``read_tbps``, ``ratio_to_read_bandwidth`` (the implied bandwidth
    over ``tp`` devices' measured one) and ``read_floor_tok_per_s`` (the decode tok/s per row at
    which the step's bytes take exactly that bandwidth). ValueError when ``output_len`` < 2 (no
    decode step)."""
    from decode_bytes import kv_read_bytes, weight_bytes
    if output_len < 2:
        raise ValueError(f'output_len {output_len}: no decode step to count bytes for (needs at least 2)')
    contexts = np.repeat(np.arange(input_len + 1, input_len + output_len), batch)
    kv = kv_read_bytes(spec, contexts, quant_policy) / (output_len - 1)
    weights = weight_bytes(spec, [batch])['by_batch'][batch]['chosen_bytes']
    step = weights + kv
    fields = dict(step_weight_bytes=int(weights), step_kv_bytes=kv, step_read_bytes=step,
                  implied_read_tbps=step * steps_per_s / 1e12)
    if read_tbps is not None:
        fields.update(read_tbps=read_tbps, ratio_to_read_bandwidth=step * steps_per_s / 1e12 / (read_tbps * tp),
                      read_floor_tok_per_s=read_tbps * tp * 1e12 / step)
    return fields


def measure_read_bandwidth(args) -> dict | None:
    """The read-bandwidth probe's record (``read_bandwidth.measure_read_tbps``) when ``--read-bandwidth``
    is on, else None; its default: on with the JAX engine on a GPU. SystemExit for
    ``--read-bandwidth`` with the pytorch backend (the probe's JAX memory pool would take the
    device from it)."""
    if args.backend == 'pytorch':
        if args.read_bandwidth:
            raise SystemExit('--read-bandwidth: the probe runs through JAX, whose memory pool would take the GPU '
                             'from the pytorch backend; not with --backend pytorch')
        return None
    import jax
    if not (jax.default_backend() == 'gpu' if args.read_bandwidth is None else args.read_bandwidth):
        return None
    from read_bandwidth import measure_read_tbps
    probe = measure_read_tbps(args.read_gib)
    print(f'read bandwidth {probe["tbps"]:.3f} TB/s ({probe["reduction"]} reduction of {probe["gib"]:.3g} GiB '
          f'{probe["dtype"]}, {probe["device"]})', flush=True)
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 16, 64, 256])
    parser.add_argument('--input-lens', type=int, nargs='+', default=[128, 2048])
    parser.add_argument('--output-len', type=int, default=256)
    parser.add_argument('--do-sample', action='store_true',
                        help="sample (GenerationConfig's top-k 50, top-p 1.0, temperature 0.8) instead of greedy")
    parser.add_argument('--read-bandwidth', action=argparse.BooleanOptionalAction, default=None,
                        help="measure the card's read bandwidth first (read_bandwidth.py) and report each run's "
                             'ratio to it (default: on when JAX runs on a GPU; the JAX engine only)')
    parser.add_argument('--read-gib', type=float, default=None,
                        help="the read-bandwidth probe's array size (default: read_bandwidth.py's)")
    args = parser.parse_args()
    if args.read_gib is not None and args.read_bandwidth is False:
        parser.error('--read-gib sizes the read-bandwidth probe: not with --no-read-bandwidth')

    probe = measure_read_bandwidth(args)
    pipe, startup = build_pipeline(args)
    spec = None
    if args.backend != 'pytorch':
        from decode_bytes import source_spec
        spec = source_spec(pipe.source, args.dtype)
    rng = np.random.default_rng(args.seed)
    print(f'start-up {startup:.1f} s')
    for input_len in args.input_lens:
        for batch in args.batch_sizes:
            record = dict(engine=f'lmdeploy_jax-{args.backend}', bench='generation', device=device_description(),
                          model=args.model_path or 'default', tp=args.tp, ep=args.ep, batch_size=batch,
                          input_len=input_len,
                          output_len=args.output_len, do_sample=args.do_sample, quant_policy=args.quant_policy,
                          **measure_generation(pipe, rng, batch, input_len, args.output_len, args.do_sample),
                          peak_device_bytes=peak_device_bytes(), startup_s=round(startup, 1))
            line = (f'batch {batch:4d} input {input_len:5d}: first token {record["first_token_ms"]["p50"]:9.1f} ms, '
                    f'{record["decode_tok_per_s_per_request"]:8.1f} tok/s per request, '
                    f'{record["total_tok_per_s"]:9.1f} tok/s total')
            if spec is not None and args.output_len > 1:
                record.update(read_fields(spec, batch, input_len, args.output_len, args.quant_policy,
                                          record['decode_tok_per_s_per_request'], probe and probe['tbps'], args.tp))
                line += f', {record["implied_read_tbps"]:.3f} TB/s read'
                if probe:
                    record['read_probe'] = {key: probe[key] for key in ('gib', 'dtype', 'reduction', 'reductions')}
                    line += f' ({record["ratio_to_read_bandwidth"]:.1%} of the measured)'
            print(line)
            print_result(record)
    pipe.close()


if __name__ == '__main__':
    main()
