#!/usr/bin/env python3
"""What XLA made of each compiled step: its thunks (command buffers, collectives, loops) and the
XLA options in effect, per executable.

    python3 benchmark/executable_report.py /tmp/m --tp 2 --max-batch-size 4 --session-len 512
    python benchmark/executable_report.py --max-batch-size 4 --session-len 256     # CPU smoke run
    python3 benchmark/executable_report.py /tmp/m --tp 2 --small-batch-tp-options '{...}' \
        --max-batch-size 4 --session-len 1024 --batch-1-tokens 256   # other options, and their speed

Why: a small tensor-parallel decode call is fast only if XLA runs it as few command buffers (CUDA
graphs) as possible, which XLA forms after the optimized HLO, so the HLO cannot show them. This
script compiles every step again with an XLA dump of its own (``step_executables.recompile_steps``)
and reads each one's thunk kinds (``*.thunk_sequence_after_thunk_passes.txt``: ``kCommandBuffer``,
``kCollectiveKernel``, ``kAllReduce``, ``kWhile``, ...; GPU only) and ``*.debug_options`` (whether
its own options took effect). The engine then serves with these executables. One JSON line per
executable, and with ``--batch-1-tokens`` one more for the timed request.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import tempfile

import numpy as np

THUNK_KIND = re.compile(r'\bk[A-Z][A-Za-z]+')
MODULE_PREFIX = re.compile(r'^(.*module_\d+\.jit_[\w\-]+)\.')      # .../module_0012.jit_decode_steps
OWN_OPTIONS = {'xla_dump_to', 'xla_gpu_per_fusion_autotune_cache_dir'}      # set by the dump and the temporary cache


def thunk_kinds(thunk_sequence: str) -> dict[str, int]:
    """Count of each thunk kind (``kCommandBuffer``, ``kAllReduce``, ...) named in a thunk-sequence dump."""
    return dict(collections.Counter(THUNK_KIND.findall(thunk_sequence)).most_common())


def step_module(dump_dir: str) -> str | None:
    """The dump file prefix (``.../module_0012.jit_decode_steps``) of the step executable whose
    modules XLA dumped into ``dump_dir`` (``recompile_steps`` gives each its own)."""
    prefixes = {MODULE_PREFIX.match(path).group(1)
                for path in glob.glob(os.path.join(dump_dir, 'module_*.jit_*after_optimizations.txt'))}
    return max(prefixes) if prefixes else None


def module_report(prefix: str | None) -> dict:
    """The thunk kinds and non-default XLA options of one dumped module (empty where not dumped),
    less the options this script sets for itself."""
    def read(pattern: str) -> str:
        paths = sorted(glob.glob(prefix + pattern)) if prefix else []
        if not paths:
            return ''
        with open(paths[0]) as f:
            return f.read()
    options = collections.defaultdict(list)        # a repeated option takes a line per value
    for line in read('.debug_options').splitlines():
        if ': ' in line:
            name, value = line.split(': ', 1)
            options[name].append(value.strip('"'))
    return dict(module=os.path.basename(prefix) if prefix else None,
                thunks=thunk_kinds(read('.*thunk_sequence_after_thunk_passes.txt')),
                xla_options={name: ','.join(values) for name, values in options.items() if name not in OWN_OPTIONS})


def greedy_tokens(pipe, rng: np.random.Generator, prompts: int, input_len: int, output_len: int) -> list[list[int]]:
    """The greedy tokens of ``prompts`` random prompts of ``input_len`` tokens, one request at a time
    (so the batch-1 executables make them): to compare engines built differently."""
    from bench_common import random_prompt_ids
    from lmdeploy_jax import GenerationConfig
    config = GenerationConfig(max_new_tokens=output_len, ignore_eos=True)

    async def one(session_id: int, ids: list[int]) -> list[int]:
        tokens = []
        async for out in pipe.generate(None, session_id, config, input_ids=ids, do_preprocess=False):
            if out.finish_reason == 'error':
                raise RuntimeError(out.response)
            tokens.extend(out.token_ids)
        return tokens
    vocab = pipe.tokenizer.vocab_size
    return [pipe._loop.run(one(20_000_000 + i, random_prompt_ids(rng, vocab, input_len))) for i in range(prompts)]


def keep_dumps(prefix: str, directory: str) -> None:
    """Copy the thunk sequence and options dumped for the module ``prefix`` into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for pattern in ('.*thunk_sequence_after_thunk_passes.txt', '.debug_options'):
        for path in glob.glob(prefix + pattern):
            shutil.copy(path, directory)


def main() -> None:
    from bench_common import add_engine_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument('--batch-1-tokens', type=int, default=0, metavar='N',
                        help='then time one request of 128 prompt tokens and N new ones (profile_generation)')
    parser.add_argument('--greedy-tokens', type=int, default=0, metavar='N',
                        help='then print the greedy tokens (N each) of 2 random prompts of 64 tokens')
    parser.add_argument('--small-batch-tp-options', type=json.loads, default=None, metavar='JSON',
                        help='XLA options (a JSON object; {}: XLA defaults) in place of the engine\'s own for '
                             'small tensor-parallel decode steps')
    parser.add_argument('--keep-dumps', metavar='DIR',
                        help="copy the batch-1 decode executables' thunk sequences and options into DIR")
    args = parser.parse_args()
    if args.small_batch_tp_options is not None and not isinstance(args.small_batch_tp_options, dict):
        parser.error(f'--small-batch-tp-options must be a JSON object, got {args.small_batch_tp_options!r}')
    from bench_common import build_pipeline, print_result
    from step_executables import dump_dir, recompile_steps
    from lmdeploy_jax.engine.xla_flags import is_decode_kind
    work = tempfile.mkdtemp(prefix='executable_report.')
    try:
        pipe, _ = build_pipeline(args)
        with pipe:
            steps = recompile_steps(pipe.engine, args.small_batch_tp_options, f'{work}/dump')
            for (kind, (rows, tokens)), (executable, options) in sorted(steps.items()):
                hlo = executable.as_text()
                prefix = step_module(dump_dir(f'{work}/dump', (kind, (rows, tokens))))
                print_result(dict(bench='executable', kind=kind, rows=rows, tokens=tokens, tp=args.tp, options=options,
                                  all_reduces=len(re.findall(r' all-reduce(?:-start)?\(', hlo)),
                                  **module_report(prefix)))
                if args.keep_dumps and prefix and is_decode_kind(kind) and rows == 1:
                    keep_dumps(prefix, args.keep_dumps)
            if args.batch_1_tokens:
                from profile_generation import measure_generation
                timing = measure_generation(pipe, np.random.default_rng(args.seed), 1, 128, args.batch_1_tokens)
                print_result(dict(bench='generation', tp=args.tp, batch_size=1, input_len=128,
                                  output_len=args.batch_1_tokens, **timing))
            if args.greedy_tokens:
                tokens = greedy_tokens(pipe, np.random.default_rng(args.seed), 2, 64, args.greedy_tokens)
                print_result(dict(bench='greedy_tokens', tp=args.tp, tokens=tokens))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
