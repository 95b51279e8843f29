"""Engine flags shared by the ``run``, ``chat`` and ``serve`` subcommands (LMDeploy's names)."""
from __future__ import annotations

import argparse

from ..messages import COMMUNICATORS, KV_QUANT_POLICIES, MODEL_FORMATS, PytorchEngineConfig, TurbomindEngineConfig


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model_path', nargs='?', default=None,
                        help='HF directory, GGUF file or HF model id (default: the embedded SmolLM2-135M-Instruct)')


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('engine')
    group.add_argument('--backend', default='turbomind', choices=['turbomind', 'pytorch'])
    group.add_argument('--tp', type=int, default=1, help='tensor-parallel devices')
    group.add_argument('--ep', type=int, default=1,
                       help="a mixture of experts' split: 1 splits each expert over the tp devices, the value of "
                            '--tp gives each device whole experts (turbomind only)')
    group.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16', 'float16'])
    group.add_argument('--session-len', type=int, default=None, help='most tokens of one session')
    group.add_argument('--max-batch-size', type=int, default=None, help='most requests run together')
    group.add_argument('--cache-max-entry-count', type=float, default=0.8,
                       help='fraction of free device memory for the KV cache')
    group.add_argument('--enable-prefix-caching', action='store_true')
    group.add_argument('--quant-policy', type=int, default=0, choices=list(KV_QUANT_POLICIES),
                       help='KV cache quantization: 0 none, 8 int8, 4 int4 (turbomind only)')
    group.add_argument('--model-format', default=None, choices=[f for f in MODEL_FORMATS if f],
                       help="the checkpoint's weights: hf (float), awq or gptq (4-bit); default: read from its "
                            'config.json (turbomind only)')
    group.add_argument('--enable-mixed-chunk', action='store_true',
                       help='prefill steps also feed decoding requests their next token (turbomind only)')
    group.add_argument('--rope-scaling-factor', type=float, default=0.0,
                       help='dynamic NTK rope scaling by this factor past the model\'s context (turbomind only)')
    group.add_argument('--nnodes', type=int, default=1, help='hosts (one process each) that run the engine together')
    group.add_argument('--node-rank', type=int, default=0, help="this host's index, 0 on --dist-init-addr's host")
    group.add_argument('--dist-init-addr', default=None, metavar='HOST:PORT',
                       help='address of node 0, reachable from every host (with --nnodes > 1)')
    group.add_argument('--devices', type=int, nargs='+', default=None, metavar='ID',
                       help="this host's device ids the process uses (with --nnodes > 1; default: all)")
    group.add_argument('--communicator', default='cuda-ipc', choices=list(COMMUNICATORS),
                       help="how small tensor-parallel steps sum over the GPUs: cuda-ipc (the peer-memory kernel where "
                            "the GPUs allow it) or nccl (XLA's all-reduce)")
    group.add_argument('--chat-template', default=None, help='builtin template name or a JSON file')
    group.add_argument('--model-name', default=None)
    group.add_argument('--log-level', default='ERROR')


_ONE_PROCESS = 'the pytorch backend runs in one process'
TURBOMIND_ONLY = {'rope_scaling_factor': "the pytorch backend runs the checkpoint's own rope (set rope_scaling in "
                                         'its config.json)',
                  'quant_policy': 'the pytorch backend keeps its KV cache unquantized',
                  'model_format': 'the pytorch backend runs float checkpoints only',
                  'nnodes': _ONE_PROCESS, 'node_rank': _ONE_PROCESS, 'dist_init_addr': _ONE_PROCESS,
                  'devices': _ONE_PROCESS, 'communicator': _ONE_PROCESS, 'ep': _ONE_PROCESS,
                  'enable_mixed_chunk': 'the pytorch backend runs each step as prefill or decode'}


def engine_config(args: argparse.Namespace):
    """The backend's config from the engine flags; ValueError naming a flag the pytorch backend
    cannot apply (given with a value other than its default)."""
    common = dict(dtype=args.dtype, tp=args.tp, session_len=args.session_len, max_batch_size=args.max_batch_size,
                  cache_max_entry_count=args.cache_max_entry_count, enable_prefix_caching=args.enable_prefix_caching)
    turbomind = {name: getattr(args, name) for name in TURBOMIND_ONLY}
    if args.backend == 'pytorch':
        defaults = TurbomindEngineConfig()
        for name, why in TURBOMIND_ONLY.items():
            if turbomind[name] != getattr(defaults, name):
                flag = '--' + name.replace('_', '-')
                raise ValueError(f'{flag} is applied by the turbomind backend only; {why}')
        return PytorchEngineConfig(**common)
    return TurbomindEngineConfig(**common, **turbomind)


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
