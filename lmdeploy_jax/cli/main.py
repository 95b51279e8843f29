"""The ``lmdeploy_jax`` command: one subcommand per module."""
from __future__ import annotations

import argparse
import sys

from . import chat, check_env, convert, list_templates, lite, run, serve

SUBCOMMANDS = [run, chat, serve, convert, lite, list_templates, check_env]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='lmdeploy_jax', description="LMDeploy's toolkit on JAX/XLA")
    subparsers = parser.add_subparsers(dest='command', required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f'lmdeploy_jax {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
