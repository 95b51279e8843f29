"""Guided decoding's cost on the JAX engine, in one process on one engine:

1. throughput of unguided requests when none of the batch is guided, then when every tenth
   request is guided (the same prompts and lengths): the unguided rows' tokens per second, and
   the guided requests' time per output token beside them;
2. one request alone, unguided then guided: the per-token cost of guiding it.

The guided requests' grammar is a regex any sequence of the random model's words matches
(``make_random_model.py``'s word-level tokenizer: tokens ``w0`` ... ``w7999``), so every guided
row runs the whole path (its matcher, the host bitmask, the mask on the device, one token per
decode call) for as many tokens as an unguided one; EOS is ignored by both.

    python3 .peer/make_random_model.py llama3-8b /tmp/llama3-8b
    PYTHONPATH=$PWD python3 benchmark/bench_guided.py /tmp/llama3-8b --num-prompts 256 \\
        --input-len 512 --output-len 256
    python3 benchmark/bench_guided.py /tmp/tiny --num-prompts 20 --input-len 16 --output-len 16  # on a CPU

Prints ``RESULT {...}`` lines (``bench_common.print_result``) and one summary line per part.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np

from bench_common import add_engine_args, build_pipeline, device_description, make_requests, percentiles, \
    print_result, run_requests

WORDS = {'type': 'regex_schema', 'regex_schema': '(w[0-9]+)+'}


def throughput(pipe, requests, every: int | None, session_base: int) -> dict:
    """Run ``requests`` at once, every ``every``-th guided (None: none); the unguided rows' output
    tokens per second (up to the last unguided finish) and both kinds' time per output token."""
    formats = [WORDS if every and i % every == every - 1 else None for i in range(len(requests))]
    timings, wall = run_requests(pipe, requests, session_base=session_base, response_formats=formats)
    free = [t for t, f in zip(timings, formats) if f is None]
    guided = [t for t, f in zip(timings, formats) if f is not None]
    start = min(t.start for t in timings)
    record = {'guided_fraction': round(len(guided) / len(timings), 3), 'requests': len(timings),
              'wall_s': round(wall, 3),
              'unguided_tok_s': round(sum(t.output_len for t in free) / (max(t.end for t in free) - start), 1),
              'unguided_tpot_ms': percentiles([t.tpot for t in free])}
    if guided:
        record['guided_tpot_ms'] = percentiles([t.tpot for t in guided])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument('--num-prompts', type=int, default=256)
    parser.add_argument('--input-len', type=int, default=512)
    parser.add_argument('--output-len', type=int, default=256)
    parser.add_argument('--every', type=int, default=10, help='one request in EVERY is guided (default: 10 %%)')
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level)
    pipe, startup = build_pipeline(args)
    rng = np.random.default_rng(args.seed)
    vocab = min(pipe.tokenizer.vocab_size, 8003)          # the random model's words (and specials) only
    requests = make_requests(rng, vocab, args.num_prompts, input_len=args.input_len, output_len=args.output_len)
    common = {'bench': 'guided', 'device': device_description(), 'model': args.model_path,
              'input_len': args.input_len, 'output_len': args.output_len, 'startup_s': round(startup, 1)}
    throughput(pipe, requests, args.every, 10_000_000)      # compiles the guided calls of the shapes it meets
    base = throughput(pipe, requests, None, 0)
    mixed = throughput(pipe, requests, args.every, 1_000_000)
    print_result({**common, **base})
    print_result({**common, **mixed})
    alone = {}
    for name, fmt in (('unguided', None), ('guided', WORDS)):
        [timing], _ = run_requests(pipe, requests[:1], progress=False, session_base=2_000_000 + len(alone),
                                   response_formats=[fmt])
        alone[name] = timing.tpot * 1000
    print_result({**common, 'alone_tpot_ms': {k: round(v, 3) for k, v in alone.items()}})
    print(f"guided {mixed['guided_fraction']:.0%} of {args.num_prompts}: unguided {mixed['unguided_tok_s']} tok/s vs "
          f"{base['unguided_tok_s']} tok/s with none guided "
          f"({mixed['unguided_tok_s'] / base['unguided_tok_s'] - 1:+.1%}); guided tpot mean "
          f"{mixed['guided_tpot_ms']['mean']} ms vs unguided {mixed['unguided_tpot_ms']['mean']} ms", flush=True)
    print(f"alone: tpot guided {alone['guided']:.2f} ms vs unguided {alone['unguided']:.2f} ms "
          f"(+{alone['guided'] - alone['unguided']:.2f} ms per token)", flush=True)
    pipe.close()


if __name__ == '__main__':
    main()
