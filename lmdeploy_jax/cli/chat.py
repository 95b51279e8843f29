"""``lmdeploy_jax chat [MODEL]``: an interactive, streaming chat in the terminal, with LMDeploy's keys.

A double Enter sends the message (so it may span lines); ``exit`` quits; ``end`` forgets the
history and starts a new session. The history lives in an ``AsyncEngine`` chat session, whose KV
is kept between turns.
"""
from __future__ import annotations

import argparse
import sys

from .engine_args import add_engine_args, add_model_arg, build_pipeline

PROMPT = '\ndouble enter to end input >>> '


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('chat', help='chat with a model in the terminal',
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_arg(parser)
    add_engine_args(parser)
    gen = parser.add_argument_group('generation')
    gen.add_argument('--max-new-tokens', type=int, default=512)
    gen.add_argument('--temperature', type=float, default=0.0, help='0 is greedy; above 0 samples')
    gen.add_argument('--top-p', type=float, default=1.0)
    gen.add_argument('--top-k', type=int, default=40)
    gen.add_argument('--repetition-penalty', type=float, default=1.0)
    parser.set_defaults(func=main)


def read_message() -> str | None:
    """Lines up to an empty one, joined; None at end of input."""
    print(PROMPT, end='', flush=True)
    lines = []
    while True:
        try:
            line = input()
        except EOFError:
            return '\n'.join(lines) if lines else None
        if not line:
            return '\n'.join(lines)
        lines.append(line)


def main(args: argparse.Namespace) -> int:
    from ..messages import GenerationConfig
    gen_config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  repetition_penalty=args.repetition_penalty)
    with build_pipeline(args) as pipe:
        session = pipe.session()
        while (message := read_message()) is not None:
            command = message.strip()
            if command == 'exit':
                break
            if command == 'end':
                session.close()
                print('(the history is cleared; a new session starts)', flush=True)
                continue
            if not command:
                continue
            for out in pipe.chat(message, session, gen_config, stream_response=True):
                sys.stdout.write(out.text)
                sys.stdout.flush()
            sys.stdout.write('\n')
    return 0
