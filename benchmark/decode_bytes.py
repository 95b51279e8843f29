"""The weight bytes one decode step reads, from a model's parameter shapes alone (no weights are
read): every parameter but the embedding table (the lm_head, or the tied table, is read whole), and
of a mixture of experts' expert stacks only the experts chosen. With ``--step-ms`` (a measured
step time), the bandwidth those bytes imply.

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
from lmdeploy_jax.models.layers.moe import gathers_weights
from lmdeploy_jax.models.loader import abstract_params
from lmdeploy_jax.models.registry import family
from lmdeploy_jax.models.spec import DTYPES, spec_from_config

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


def decode_bytes(config: dict, dtype: str, batches: list[int]) -> dict:
    arch = config['architectures'][0]
    spec = spec_from_config(config, family(arch), arch, jnp.dtype(DTYPES[dtype]), ())
    spec = dataclasses.replace(spec, quantization=weight_quantization('config.json', config))   # 4-bit AWQ/GPTQ
    _, abstract = abstract_params(spec)
    flat = traversals.flatten_mapping(nnx.to_pure_dict(abstract))
    size = {path: int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for path, x in flat.items()}
    experts = sum(n for path, n in size.items() if 'experts' in path)
    table = 0 if spec.tie_word_embeddings else size[('embed',)]
    others = sum(size.values()) - experts - table
    out = {'architecture': arch, 'dtype': dtype, 'param_bytes': sum(size.values()), 'by_batch': {}}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', nargs='?', help='a model directory (its config.json)')
    parser.add_argument('--shape', help='a make_random_model.py shape instead of a directory')
    parser.add_argument('--dtype', default='bfloat16', choices=DTYPES)
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 8, 32])
    parser.add_argument('--step-ms', type=float, help='a measured decode step time (the first batch size)')
    args = parser.parse_args()
    if (args.model is None) == (args.shape is None):
        parser.error('give a model directory or --shape')
    config = shape_config(args.shape) if args.shape else json.load(open(os.path.join(args.model, 'config.json')))
    out = decode_bytes(config, args.dtype, args.batch)
    if args.step_ms:
        first = out['by_batch'][args.batch[0]]
        seconds = args.step_ms / 1e3
        out['implied_bytes_per_s'] = {key: n / seconds for key, n in first.items() if key.endswith('bytes')}
    print(json.dumps(out, indent=1))


if __name__ == '__main__':
    main()
