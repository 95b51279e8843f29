"""``lmdeploy_jax lite auto_awq``: LMDeploy's ``lite`` command group; ``auto_awq`` quantizes a
Hugging Face model to a 4-bit AWQ checkpoint (``lmdeploy_jax.lite``)."""
from __future__ import annotations

import argparse

from .model_command import add_model_command

# ``lite.auto_awq``'s keywords, each the flag of its name (``--work-dir`` for ``work_dir``, LMDeploy's
# flags): (its default, help). A flag whose default is False is a switch; any other takes a value
# of its default's type.
AUTO_AWQ_OPTIONS = {
    'work_dir': ('./work_dir', 'the new (absent or empty) directory to write the checkpoint to'),
    'calib_dataset': ('wikitext2', 'a local text file, or a named hub dataset (wikitext2, c4, pileval, openwebtext; '
                                   'needs the `datasets` package and the hub)'),
    'calib_samples': (128, 'calibration samples; 0: data-free quantization, no smoothing'),
    'calib_seqlen': (2048, 'tokens per calibration sample'),
    'batch_size': (1, 'calibration samples per forward; larger is faster and takes more memory'),
    'search_scale': (False, 'search the smoothing ratio of each linear group for the least output error, then (as '
                            'AutoAWQ does) each quantization group\'s clipping range; without it the ratio is 0.5 '
                            '(LMDeploy\'s default) and nothing is clipped'),
    'w_bits': (4, 'weight bits; only 4'),
    'w_sym': (False, 'symmetric quantization: refused, AWQ GEMM checkpoints keep zero points'),
    'w_group_size': (128, 'input channels per quantization group; must divide every linear\'s input width'),
    'dtype': ('auto', 'dtype of the unquantized tensors: auto (bfloat16 for a bfloat16 model, else float16), '
                      'float16 or bfloat16'),
}


def add_parser(subparsers) -> None:
    lite = subparsers.add_parser('lite', help='compress a model (LMDeploy\'s lite toolkit)',
                                 description='Compress a model with LMDeploy\'s lite toolkit.')
    commands = lite.add_subparsers(dest='lite_command', required=True)
    parser = add_model_command(
        commands, 'auto_awq', 'quantize a model\'s weights to 4 bits with AWQ',
        'Quantize a Hugging Face Llama-family model (Llama, Mistral, Qwen2, Qwen3) to 4-bit weights with '
        'activation-aware scales, one decoder layer at a time, and write a standard AutoAWQ (GEMM) checkpoint '
        'that pipeline() and other AWQ loaders read.', 'model', 'Hugging Face directory or hub id')
    for name, (default, text) in AUTO_AWQ_OPTIONS.items():
        flag = '--' + name.replace('_', '-')
        if default is False:
            parser.add_argument(flag, action='store_true', help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=text)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from ..lite import auto_awq
    dst = auto_awq(args.model, **{name: getattr(args, name) for name in AUTO_AWQ_OPTIONS})
    print(f'AWQ checkpoint written to {dst}')
    return 0
