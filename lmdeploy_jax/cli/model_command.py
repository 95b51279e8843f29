"""The parser of a subcommand that reads one model given by path and writes it anew (``convert``,
``lite auto_awq``)."""
from __future__ import annotations

import argparse


def add_model_command(subparsers, name: str, summary: str, description: str, model_arg: str,
                      model_help: str) -> argparse.ArgumentParser:
    """Subcommand ``name`` of ``subparsers``: ``summary`` in the list of commands, ``description``
    atop its --help, each flag's default shown after its help, and the one positional argument
    ``model_arg`` (``model_help``). The caller adds its flags and ``func``."""
    parser = subparsers.add_parser(name, help=summary, description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(model_arg, help=model_help)
    return parser
