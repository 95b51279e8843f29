#!/usr/bin/env python3
"""What XLA made of each compiled step: its thunks (command buffers, collectives, loops) and the
XLA options in effect, per executable.

    python3 benchmark/executable_report.py /tmp/m --tp 2 --max-batch-size 4 --session-len 512
    python benchmark/executable_report.py --max-batch-size 4 --session-len 256     # CPU smoke run
    LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS='{...}' python3 benchmark/executable_report.py /tmp/m --tp 2 \
        --max-batch-size 4 --session-len 1024 --batch-1-tokens 256   # other options, and their speed

Why: at tp > 1 a small-batch decode call is fast only if XLA runs it as few command buffers
(CUDA graphs) as possible, with the collectives inside them; the executable's own XLA options
(``engine/xla_flags.py``) ask for that. On a GPU, XLA forms command buffers from the thunk
sequence, after the optimized HLO, so the HLO cannot show them; this script has XLA dump every
module it compiles and reads, per step executable (matched to its module by the optimized HLO
text): the thunk kinds of ``*.thunk_sequence_after_thunk_passes.txt`` (``kCommandBuffer``,
``kCollectiveKernel``, the thunk of XLA's one-shot all-reduce, ``kAllReduce`` NCCL's, ``kAsyncStart``,
``kWhile``, ...; GPU only) and ``*.debug_options`` (the options that differ from XLA's defaults:
whether an executable's own options took effect). It compiles everything afresh (a temporary
compilation cache), since a loaded executable leaves no dump. One JSON line per executable, and
with ``--batch-1-tokens`` one more for the timed request.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile

import numpy as np

THUNK_KIND = re.compile(r'\bk[A-Z][A-Za-z]+')
MODULE_PREFIX = re.compile(r'^(.*module_\d+\.[\w\-]+)\.')      # .../module_0012.jit_decode_steps
OWN_OPTIONS = {'xla_dump_to', 'xla_gpu_per_fusion_autotune_cache_dir'}      # set by the dump and the temporary cache
BACKEND_CONFIG = re.compile(r', backend_config=.*$', re.MULTILINE)


def normalized(hlo: str) -> str:
    """HLO text without the instructions' backend configs, whose JSON keys the dump and
    ``Compiled.as_text()`` print in different orders."""
    return BACKEND_CONFIG.sub('', hlo).strip()


def thunk_kinds(thunk_sequence: str) -> dict[str, int]:
    """Count of each thunk kind (``kCommandBuffer``, ``kAllReduce``, ...) named in a thunk-sequence dump."""
    return dict(collections.Counter(THUNK_KIND.findall(thunk_sequence)).most_common())


def dumped_modules(dump_dir: str) -> dict[str, str]:
    """``normalized`` optimized HLO -> the dump file prefix of its module (``.../module_0012.jit_decode_steps``)."""
    modules = {}
    for path in glob.glob(os.path.join(dump_dir, '*_after_optimizations.txt')):
        prefix = MODULE_PREFIX.match(path).group(1)
        with open(path) as f:
            modules[normalized(f.read())] = prefix
    return modules


def module_report(prefix: str | None) -> dict:
    """The thunk kinds and non-default XLA options of one dumped module (empty where not dumped),
    less the options this script sets for itself."""
    def read(suffix: str) -> str:
        if prefix is None or not os.path.exists(prefix + suffix):
            return ''
        with open(prefix + suffix) as f:
            return f.read()
    options = collections.defaultdict(list)        # a repeated option takes a line per value
    for line in read('.debug_options').splitlines():
        if ': ' in line:
            name, value = line.split(': ', 1)
            options[name].append(value.strip('"'))
    return dict(module=os.path.basename(prefix) if prefix else None,
                thunks=thunk_kinds(read('.thunk_sequence_after_thunk_passes.txt')),
                xla_options={name: ','.join(values) for name, values in options.items() if name not in OWN_OPTIONS})


def main() -> None:
    from bench_common import add_engine_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    parser.add_argument('--batch-1-tokens', type=int, default=0, metavar='N',
                        help='then time one request of 128 prompt tokens and N new ones (profile_generation)')
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix='executable_report.')
    # before JAX starts: XLA reads its flags, and JAX its cache directory, once
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={work}/dump".strip()
    os.environ['JAX_COMPILATION_CACHE_DIR'] = f'{work}/cache'
    from bench_common import build_pipeline, print_result
    try:
        pipe, _ = build_pipeline(args)
        with pipe:
            modules = dumped_modules(f'{work}/dump')
            for (kind, (rows, tokens)), (executable, options) in sorted(pipe.engine.compiled_steps().items()):
                hlo = executable.as_text()
                print_result(dict(bench='executable', kind=kind, rows=rows, tokens=tokens, tp=args.tp, options=options,
                                  all_reduces=len(re.findall(r' all-reduce(?:-start)?\(', hlo)),
                                  **module_report(modules.get(normalized(hlo)))))
            if args.batch_1_tokens:
                from profile_generation import measure_generation
                timing = measure_generation(pipe, np.random.default_rng(args.seed), 1, 128, args.batch_1_tokens)
                print_result(dict(bench='generation', tp=args.tp, batch_size=1, input_len=128,
                                  output_len=args.batch_1_tokens, **timing))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
