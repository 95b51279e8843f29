"""``lmdeploy_jax run PROMPT``: answer one prompt, streaming to the terminal."""
from __future__ import annotations

import argparse
import sys

from .engine_args import add_engine_args, add_model_arg, build_pipeline


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('run', help='answer one prompt with a model, streaming the reply')
    parser.add_argument('prompt', help='the user message')
    add_model_arg(parser)
    add_engine_args(parser)
    parser.add_argument('--max-new-tokens', type=int, default=512)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..messages import GenerationConfig
    with build_pipeline(args) as pipe:
        for out in pipe.stream_infer([args.prompt], GenerationConfig(max_new_tokens=args.max_new_tokens)):
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write('\n')
    return 0
