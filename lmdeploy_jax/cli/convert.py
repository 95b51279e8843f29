"""``lmdeploy_jax convert``: a model -> an engine checkpoint directory (LMDeploy's ``convert``)."""
from __future__ import annotations

import argparse

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert a model to an engine checkpoint (Orbax, the JAX engine\'s layout)',
        description='Convert a Hugging Face safetensors directory, a GGUF file or a hub id to an engine '
                    'checkpoint directory that `lmdeploy_jax serve/chat/run` and pipeline() load directly.')
    parser.add_argument('model_path', help='Hugging Face directory, .gguf file or hub id')
    parser.add_argument('--dst-path', default='./workspace', help='the new directory to write (default: %(default)s)')
    parser.add_argument('--dtype', default='auto', choices=DTYPES,
                        help="the parameters' dtype ('auto': the checkpoint's; default: %(default)s)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from convert import convert
    print(f'converted {args.model_path} -> {convert(args.model_path, args.dst_path, args.dtype)}')
    return 0
