"""``lmdeploy_jax convert``: a model -> an engine checkpoint directory (LMDeploy's ``convert``)."""
from __future__ import annotations

import argparse

from .model_command import add_model_command

DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
FORMATS = ('engine', 'hf')


def add_parser(subparsers) -> None:
    parser = add_model_command(
        subparsers, 'convert', 'convert a model to an engine checkpoint (Orbax, the JAX engine\'s layout)',
        'Convert a Hugging Face safetensors directory, a GGUF file or a hub id to an engine checkpoint directory '
        'that `lmdeploy_jax serve/chat/run` and pipeline() load directly, or (--dst-format hf) a model back to a '
        'Hugging Face safetensors directory.', 'model_path', 'Hugging Face directory, .gguf file or hub id')
    parser.add_argument('--dst-path', default='./workspace', help='the new directory to write')
    parser.add_argument('--dtype', default='auto', choices=DTYPES,
                        help="the parameters' dtype ('auto': the checkpoint's)")
    parser.add_argument('--dst-format', default='engine', choices=FORMATS,
                        help="'engine': an engine checkpoint (Orbax); 'hf': a Hugging Face safetensors "
                             'directory, e.g. from an engine checkpoint')
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from convert import convert, export_hf
    write = convert if args.dst_format == 'engine' else export_hf
    print(f'converted {args.model_path} -> {write(args.model_path, args.dst_path, args.dtype)}')
    return 0
