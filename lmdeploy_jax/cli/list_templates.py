"""``lmdeploy_jax list``: the chat template names ``--chat-template`` accepts (LMDeploy's ``list``)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('list', help='list the builtin chat template names')
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..chat_template import list_templates
    print('Chat templates (pass one to --chat-template, or a JSON file of ChatTemplateConfig):')
    for name in list_templates():
        print(name)
    return 0
