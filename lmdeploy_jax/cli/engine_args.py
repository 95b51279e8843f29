"""Engine flags shared by the ``run``, ``chat`` and ``serve`` subcommands (LMDeploy's names)."""
from __future__ import annotations

import argparse

from ..messages import PytorchEngineConfig, TurbomindEngineConfig


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model_path', nargs='?', default=None,
                        help='HF directory, GGUF file or HF model id (default: the embedded SmolLM2-135M-Instruct)')


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('engine')
    group.add_argument('--backend', default='turbomind', choices=['turbomind', 'pytorch'])
    group.add_argument('--tp', type=int, default=1, help='tensor-parallel devices')
    group.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'])
    group.add_argument('--session-len', type=int, default=None, help='most tokens of one session')
    group.add_argument('--max-batch-size', type=int, default=None, help='most requests run together')
    group.add_argument('--cache-max-entry-count', type=float, default=0.8,
                       help='fraction of free device memory for the KV cache')
    group.add_argument('--enable-prefix-caching', action='store_true')
    group.add_argument('--rope-scaling-factor', type=float, default=0.0,
                       help='dynamic NTK rope scaling by this factor past the model\'s context (turbomind only)')
    group.add_argument('--chat-template', default=None, help='builtin template name or a JSON file')
    group.add_argument('--model-name', default=None)
    group.add_argument('--log-level', default='ERROR')


def engine_config(args: argparse.Namespace):
    common = dict(dtype=args.dtype, tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
                  cache_max_entry_count=args.cache_max_entry_count, enable_prefix_caching=args.enable_prefix_caching)
    if args.backend == 'pytorch':
        if args.rope_scaling_factor:
            raise ValueError('--rope-scaling-factor is applied by the turbomind backend only; the pytorch '
                             "backend runs the checkpoint's own rope (set rope_scaling in its config.json)")
        return PytorchEngineConfig(**common)
    return TurbomindEngineConfig(**common, rope_scaling_factor=args.rope_scaling_factor)


def chat_template_config(args: argparse.Namespace):
    if args.chat_template is None:
        return None
    from ..chat_template import ChatTemplateConfig
    if args.chat_template.endswith('.json'):
        return ChatTemplateConfig.from_json(args.chat_template)
    return ChatTemplateConfig(model_name=args.chat_template)


def pipeline_kwargs(args: argparse.Namespace) -> dict:
    """What ``pipeline()`` takes besides the model path, from the engine flags."""
    return dict(model_name=args.model_name, backend=args.backend, backend_config=engine_config(args),
                chat_template_config=chat_template_config(args), log_level=args.log_level)


def build_pipeline(args: argparse.Namespace):
    from ..api import pipeline
    return pipeline(args.model_path, **pipeline_kwargs(args))
