#!/usr/bin/env python3
"""What XLA made of each compiled step: command buffers, loops and collectives, per executable.

    python3 benchmark/executable_report.py /tmp/m --tp 2 --max-batch-size 4 --session-len 512
    python benchmark/executable_report.py --max-batch-size 4 --session-len 256     # CPU smoke run

Why: at tp > 1 a small-batch decode call is fast only if XLA runs it as few command buffers
(CUDA graphs) as possible, with the layer loop and the collectives inside them; the executable's
own XLA options (``engine/xla_flags.py``) ask for that, and this shows whether XLA did it without
a trace. Reads the optimized HLO (``Compiled.as_text()``), where XLA's command-buffer scheduling
pass has already moved ops into ``command_buffer`` computations. One JSON line per executable:
its kind, shape and options, and counts of command-buffer computations, ``while`` loops (and how
many of them inside command buffers), all-reduces and all-gathers (synchronous or async
start/done) and custom calls. On a CPU there are no command buffers (the counts are 0).
"""
from __future__ import annotations

import argparse
import json
import re

from bench_common import add_engine_args, build_pipeline

COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')


def computations(hlo: str) -> dict[str, str]:
    """Computation name -> its body, from HLO text (a computation opens with a line ending in ``{``
    at column 0 and closes with a ``}`` line)."""
    bodies, name, lines = {}, None, []
    for line in hlo.splitlines():
        match = COMPUTATION.match(line) if not line.startswith(' ') else None
        if match:
            name, lines = match.group(1), []
        elif line.startswith('}') and name is not None:
            bodies[name], name = '\n'.join(lines), None
        elif name is not None:
            lines.append(line)
    return bodies


def summarize(hlo: str) -> dict:
    """Counts of the ops that decide how a step runs (see the module doc)."""
    bodies = computations(hlo)
    in_buffers = [body for name, body in bodies.items() if 'command_buffer' in name]
    everything = list(bodies.values())

    def count(op: str, texts: list[str] = everything) -> int:
        return sum(len(re.findall(rf' {re.escape(op)}\(', text)) for text in texts)
    return dict(computations=len(bodies), command_buffers=len(in_buffers),
                whiles=count('while'), whiles_in_command_buffers=count('while', in_buffers),
                all_reduce_sync=count('all-reduce'), all_reduce_async=count('all-reduce-start'),
                all_gather_sync=count('all-gather'), all_gather_async=count('all-gather-start'),
                custom_calls=count('custom-call'), fusions=count('fusion'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(parser)
    args = parser.parse_args()
    pipe, _ = build_pipeline(args)
    with pipe:
        for (kind, (rows, tokens)), (executable, options) in sorted(pipe.engine.compiled_steps().items()):
            record = dict(bench='executable', kind=kind, rows=rows, tokens=tokens, tp=args.tp,
                          options=sorted(options), **summarize(executable.as_text()))
            print('RESULT ' + json.dumps(record), flush=True)


if __name__ == '__main__':
    main()
