"""``lmdeploy_jax lite auto_awq``: LMDeploy's ``lite`` command group; ``auto_awq`` quantizes a
Hugging Face model to a 4-bit AWQ checkpoint (``lmdeploy_jax.lite``)."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    lite = subparsers.add_parser('lite', help='compress a model (LMDeploy\'s lite toolkit)',
                                 description='Compress a model with LMDeploy\'s lite toolkit.')
    commands = lite.add_subparsers(dest='lite_command', required=True)
    parser = commands.add_parser(
        'auto_awq', help='quantize a model\'s weights to 4 bits with AWQ',
        description='Quantize a Hugging Face Llama-family model (Llama, Mistral, Qwen2, Qwen3) to 4-bit '
                    'weights with activation-aware scales, one decoder layer at a time, and write a standard '
                    'AutoAWQ (GEMM) checkpoint that pipeline() and other AWQ loaders read.')
    parser.add_argument('model', help='Hugging Face directory or hub id')
    parser.add_argument('--work-dir', default='./work_dir',
                        help='the new (absent or empty) directory to write the checkpoint to (default: %(default)s)')
    parser.add_argument('--calib-dataset', default='wikitext2',
                        help='a local text file, or a named hub dataset (wikitext2, c4, pileval, openwebtext; '
                             'needs the `datasets` package and the hub) (default: %(default)s)')
    parser.add_argument('--calib-samples', type=int, default=128,
                        help='calibration samples; 0: data-free quantization, no smoothing (default: %(default)s)')
    parser.add_argument('--calib-seqlen', type=int, default=2048,
                        help='tokens per calibration sample (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='calibration samples per forward; larger is faster and takes more memory '
                             '(default: %(default)s)')
    parser.add_argument('--search-scale', action='store_true',
                        help='search the smoothing ratio of each linear group for the least output error, '
                             'then (as AutoAWQ does) each quantization group\'s clipping range; without it the '
                             'ratio is 0.5 (LMDeploy\'s default) and nothing is clipped')
    parser.add_argument('--w-bits', type=int, default=4, help='weight bits; only 4 (default: %(default)s)')
    parser.add_argument('--w-sym', action='store_true',
                        help='symmetric quantization: refused, AWQ GEMM checkpoints keep zero points')
    parser.add_argument('--w-group-size', type=int, default=128,
                        help='input channels per quantization group; must divide every linear\'s input width '
                             '(default: %(default)s)')
    parser.add_argument('--dtype', default='auto',
                        help='dtype of the unquantized tensors: auto (bfloat16 for a bfloat16 model, else '
                             'float16), float16 or bfloat16 (default: %(default)s)')
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..lite import auto_awq
    dst = auto_awq(args.model, work_dir=args.work_dir, calib_dataset=args.calib_dataset,
                   calib_samples=args.calib_samples, batch_size=args.batch_size, calib_seqlen=args.calib_seqlen,
                   w_bits=args.w_bits, w_sym=args.w_sym, w_group_size=args.w_group_size,
                   search_scale=args.search_scale, dtype=args.dtype)
    print(f'AWQ checkpoint written to {dst}')
    return 0
