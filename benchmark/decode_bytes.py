"""The weight bytes one decode step reads, from a model's parameter shapes alone (no weights are
read): every parameter but the embedding table (the lm_head, or the tied table, is read whole), and
of a mixture of experts' expert stacks only the experts chosen. With ``--context``, also the KV
bytes (``kv_read_bytes``) of a batch whose rows each attend that many keys. With ``--step-ms`` (a
measured step time), the bandwidth those bytes imply.

For a batch of ``b`` tokens each choosing ``k`` of ``E`` experts, uniformly routed, a layer
chooses ``E * (1 - (1 - k / E) ** b)`` distinct experts on average (``k`` at ``b = 1``). Three
figures per batch:

- ``chosen_bytes``: only the chosen experts' weights read once (the ideal);
- ``per_choice_copy_bytes`` (where the step gathers, ``layers.moe.gathers_weights``):
  ``chosen_bytes`` plus a copy of each choice's weights written and read again, what the gathered
  path (``layers.moe.per_choice_mlp``) costs if XLA writes the gather out rather than fusing it
  into the matmul;
- ``all_experts_bytes``: every expert read, as a ragged_dot expanded into one dense product per
  expert does.

    python benchmark/decode_bytes.py --shape qwen3-30b-a3b [--batch 1 8 32] [--step-ms 2.1]
    python benchmark/decode_bytes.py --shape llama3-8b --batch 128 --context 4096 [--quant-policy 8]
    python benchmark/decode_bytes.py /path/to/model [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals

from lmdeploy_jax.checkpoint.quantization import weight_quantization
from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.models.kv_cache import kv_bytes_per_block
from lmdeploy_jax.models.layers.moe import gathers_weights
from lmdeploy_jax.models.loader import abstract_params, model_spec
from lmdeploy_jax.models.registry import family
from lmdeploy_jax.models.restore import checkpoint_spec
from lmdeploy_jax.models.safetensors_file import SafetensorsCheckpoint
from lmdeploy_jax.models.spec import DTYPES, ModelSpec, spec_from_config

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'peers')


def shape_config(shape: str) -> dict:
    """config.json of a ``make_random_model.py`` shape, as transformers writes it."""
    sys.path.insert(0, PEERS)
    import transformers
    from make_random_model import ARCHS, SHAPES
    fields = dict(SHAPES[shape])
    config_cls, model_cls = ARCHS[fields.pop('arch')]
    config = getattr(transformers, config_cls)(tie_word_embeddings=False, **fields).to_dict()
    return {**config, 'architectures': [model_cls]}


def config_spec(config: dict, dtype: str) -> ModelSpec:
    """The spec of a config.json dict with ``dtype`` weights (4-bit AWQ/GPTQ where it says so)."""
    arch = config['architectures'][0]
    spec = spec_from_config(config, family(arch), arch, jnp.dtype(DTYPES[dtype]), ())
    return dataclasses.replace(spec, quantization=weight_quantization('config.json', config))


def source_spec(source: ModelSource, dtype: str = 'auto') -> ModelSpec:
    """The spec the JAX engine loads ``source`` with (``dtype`` 'auto': the checkpoint's own)."""
    if source.is_engine_checkpoint:
        return checkpoint_spec(source, dtype)
    with SafetensorsCheckpoint(source.hf_dir) as ckpt:
        return model_spec(source, ckpt, dtype)


def decode_bytes(config: dict, dtype: str, batches: list[int]) -> dict:
    """``weight_bytes`` of a config.json dict with ``dtype`` weights, with its architecture and dtype."""
    return {'architecture': config['architectures'][0], 'dtype': dtype,
            **weight_bytes(config_spec(config, dtype), batches)}


def weight_bytes(spec: ModelSpec, batches: list[int]) -> dict:
    """``{'param_bytes', 'by_batch': {batch: {'chosen_bytes', ...}}}``: the weight bytes a decode step
    of each batch size reads (the module's docstring)."""
    _, abstract = abstract_params(spec)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(abstract))
    size = {path: int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for path, x in flat.items()}
    experts = sum(n for path, n in size.items() if 'experts' in path)
    table = 0 if spec.tie_word_embeddings else size[('embed',)]
    others = sum(size.values()) - experts - table
    out = {'param_bytes': sum(size.values()), 'by_batch': {}}
    E, k = spec.num_experts, spec.experts_per_token
    for b in batches:
        if not E:
            out['by_batch'][b] = {'chosen_bytes': others}
            continue
        chosen = E * (1 - (1 - k / E) ** b)
        per_expert = experts / E
        row = {'experts_chosen_per_layer': round(chosen, 2), 'chosen_bytes': int(others + chosen * per_expert),
               'all_experts_bytes': others + experts}
        if gathers_weights(b * k, E):
            row['per_choice_copy_bytes'] = int(others + (chosen + 2 * b * k) * per_expert)
        out['by_batch'][b] = row
    return out


def kv_read_bytes(spec: ModelSpec, contexts, quant_policy: int = 0) -> int:
    """The K and V bytes one decode step reads over every layer for rows that attend ``contexts``
    keys each (ints; the new token's key included): a layer with a sliding window reads at most
    the window's keys. ``quant_policy`` 8 or 4: the stored codes with their scales and zeros
    (``kv_cache.kv_bytes_per_block``; ValueError for another value). The model's own KV heads:
    copies of a head that tensor parallelism keeps on several devices are not counted."""
    per_layer_key = kv_bytes_per_block(spec, 1, quant_policy) // spec.num_layers
    keys = np.asarray(contexts, np.int64).reshape(-1, 1)
    windows = np.asarray(spec.sliding_windows or (0,) * spec.num_layers, np.int64)
    seen = np.where(windows > 0, np.minimum(keys, windows), keys)
    return int(seen.sum()) * per_layer_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', nargs='?', help='a model directory (its config.json)')
    parser.add_argument('--shape', help='a make_random_model.py shape instead of a directory')
    parser.add_argument('--dtype', default='bfloat16', choices=DTYPES)
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 8, 32])
    parser.add_argument('--context', type=int, default=None,
                        help="keys each row attends: adds each batch's KV bytes and the sum of both")
    parser.add_argument('--quant-policy', type=int, default=0, choices=[0, 8, 4], help='the KV cache quantization')
    parser.add_argument('--step-ms', type=float, help='a measured decode step time (the first batch size)')
    args = parser.parse_args()
    if (args.model is None) == (args.shape is None):
        parser.error('give a model directory or --shape')
    if args.quant_policy and args.context is None:
        parser.error('--quant-policy counts KV bytes: give --context too')
    config = shape_config(args.shape) if args.shape else json.load(open(os.path.join(args.model, 'config.json')))
    out = decode_bytes(config, args.dtype, args.batch)
    if args.context is not None:
        spec = config_spec(config, args.dtype)
        for b, row in out['by_batch'].items():
            row['kv_bytes'] = kv_read_bytes(spec, [args.context] * b, args.quant_policy)
            row['chosen_and_kv_bytes'] = row['chosen_bytes'] + row['kv_bytes']
    if args.step_ms:
        first = out['by_batch'][args.batch[0]]
        seconds = args.step_ms / 1e3
        out['implied_bytes_per_s'] = {key: n / seconds for key, n in first.items() if key.endswith('bytes')}
    print(json.dumps(out, indent=1))


if __name__ == '__main__':
    main()
