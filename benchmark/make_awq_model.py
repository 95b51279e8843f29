#!/usr/bin/env python3
"""Write a random AWQ-layout (AutoAWQ GEMM, 4-bit) checkpoint from a random float one of the same
shape (``make_random_model.py``'s, e.g. llama3-8b), for the W4A16 benchmarks.

Every projection's ``<module>.weight`` (q/k/v/o, gate/up/down) becomes random ``qweight`` and
``qzeros`` words (uniform codes and zero points) and float16 ``scales`` near 0.0025 (so the
dequantized weights are about the float model's size); every other tensor, the config (with a
``quantization_config`` added), and the tokenizer are copied. Throughput does not depend on the
values when generation ignores EOS. Shard by shard, vectorised numpy: about a minute for 8B.

    python benchmark/make_awq_model.py /tmp/llama3-8b /tmp/llama3-8b-awq [--group-size 128]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


def awq_tensors(rng: np.random.Generator, module: str, out_features: int, in_features: int, group: int) -> dict:
    """Random AWQ GEMM tensors of a ``[out, in]`` linear (``checkpoint/awq_packing.py``'s layout)."""
    words = lambda rows: rng.integers(0, 1 << 32, (rows, out_features // 8), dtype=np.uint32).view(np.int32)  # noqa: E731
    scales = rng.uniform(0.002, 0.003, (in_features // group, out_features)).astype(np.float16)
    return {f'{module}.qweight': words(in_features), f'{module}.qzeros': words(in_features // group),
            f'{module}.scales': scales}


def convert_shard(src: str, dst: str, rng: np.random.Generator, group: int) -> list[str]:
    """One safetensors file: projections replaced, the rest copied; returns the tensor names written."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = {}
    with safe_open(src, framework='pt') as f:
        for name in f.keys():
            module, _, leaf = name.rpartition('.')
            if leaf == 'weight' and module.rpartition('.')[2] in PROJECTIONS:
                out_features, in_features = f.get_slice(name).get_shape()
                out.update({k: torch.from_numpy(v) for k, v in
                            awq_tensors(rng, module, out_features, in_features, group).items()})
            else:
                out[name] = f.get_tensor(name)
    save_file(out, dst, metadata={'format': 'pt'})
    return list(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='a float Hugging Face checkpoint directory')
    parser.add_argument('dst')
    parser.add_argument('--group-size', type=int, default=128)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.dst, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    shards = sorted(f for f in os.listdir(args.src) if f.endswith('.safetensors'))
    if not shards:
        raise SystemExit(f'{args.src}: no .safetensors files')
    weight_map = {}
    for shard in shards:
        for name in convert_shard(os.path.join(args.src, shard), os.path.join(args.dst, shard), rng, args.group_size):
            weight_map[name] = shard
        print(f'{shard}: done', flush=True)
    for entry in os.listdir(args.src):
        path = os.path.join(args.src, entry)
        if os.path.isfile(path) and not entry.endswith('.safetensors') and entry not in (
                'config.json', 'model.safetensors.index.json'):
            shutil.copy(path, args.dst)
    if os.path.exists(os.path.join(args.src, 'model.safetensors.index.json')):
        with open(os.path.join(args.dst, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {}, 'weight_map': weight_map}, f)
    with open(os.path.join(args.src, 'config.json')) as f:
        config = json.load(f)
    config['quantization_config'] = {'quant_method': 'awq', 'bits': 4, 'group_size': args.group_size,
                                     'zero_point': True, 'version': 'gemm'}
    with open(os.path.join(args.dst, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)
    print(f'wrote {args.dst}')


if __name__ == '__main__':
    main()
