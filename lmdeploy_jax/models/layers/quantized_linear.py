"""A 4-bit (W4A16) projection for AWQ/GPTQ checkpoints: the codes stay packed on the device and
the matmul dequantizes them in registers (``pallas_kernels.w4a16``).

``make_linear`` is what the attention and MLP layers build: a ``Linear`` for a float checkpoint, a
``QuantizedLinear`` when ``spec.quantization`` says the checkpoint is quantized. Its parameters are
not Hugging Face's ``[out, in]`` weight but, per layer, ``qweight`` int32 ``[in // 8, out]`` (the
tile layout of ``pallas_kernels.w4a16.layout``), ``scales`` and ``zeros`` float16 ``[groups, out]``;
a fused one (qkv, gate_up) has its parts side by side along ``out``, laid out shard by shard as the
float one's rows are (``fused.py``). ``quantized_weight_map`` turns a family's float weight map into
the map of these parameters, so a family needs no change to load AWQ/GPTQ weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.w4a16.layout import NIBBLES, TILE_K

from ..spec import ModelSpec
from ..weight_map import Path, Quantized, Source
from .linear import Linear, _leading, linear

QUANTIZED_LEAVES = ('qweight', 'scales', 'zeros')
SCALE_DTYPE = jnp.float16          # AWQ/GPTQ checkpoints store float16 scales; kept exact


class QuantizedLinear(nnx.Module):
    """``qweight [layers, in // 8, out]`` int32, ``scales``/``zeros [layers, groups, out]`` float16
    and, with ``bias``, ``b [layers, out]`` in ``dtype``; ``layers=None`` drops the leading axis."""

    def __init__(self, layers: int | None, out_features: int, in_features: int, groups: int, dtype, *,
                 bias: bool):
        lead = _leading(layers)
        self.qweight = nnx.Param(jnp.zeros((*lead, in_features // NIBBLES, out_features), jnp.int32))
        self.scales = nnx.Param(jnp.zeros((*lead, groups, out_features), SCALE_DTYPE))
        self.zeros = nnx.Param(jnp.zeros((*lead, groups, out_features), SCALE_DTYPE))
        self.b = nnx.Param(jnp.zeros((*lead, out_features), dtype)) if bias else None

    def weights(self, index: jax.Array | None = None) -> dict:
        """``{'qweight', 'scales', 'zeros', 'b'?}`` of layer ``index`` (None: the whole parameters),
        what ``layers.linear.linear`` takes."""
        p = {leaf: getattr(self, leaf)[...] for leaf in QUANTIZED_LEAVES}
        if self.b is not None:
            p['b'] = self.b[...]
        if index is None:
            return p
        return {k: jax.lax.dynamic_index_in_dim(v, index, keepdims=False) for k, v in p.items()}

    def __call__(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        return linear(x, self.weights(index))


def make_linear(spec: ModelSpec, layers: int | None, out_features: int, in_features: int, *, bias: bool,
                rngs: nnx.Rngs) -> Linear | QuantizedLinear:
    """The projection of a decoder layer's attention or MLP: 4-bit when ``spec.quantization`` is set."""
    if spec.quantization is None:
        return Linear(layers, out_features, in_features, spec.dtype, bias=bias, rngs=rngs)
    return QuantizedLinear(layers, out_features, in_features, spec.quantization.groups(in_features), spec.dtype,
                           bias=bias)


def quantized_weight_map(spec: ModelSpec, weight_map: dict[Path, Source], params: dict) -> dict[Path, Source]:
    """``weight_map`` with each quantized linear's ``w`` entry (a ``Tensor`` or ``Fused`` naming
    ``<module>.weight``) replaced by one ``Quantized`` entry per leaf of ``QUANTIZED_LEAVES``;
    ``params``: the model's parameters by state path (which linears are quantized)."""
    out = dict(weight_map)
    for path, source in weight_map.items():
        if path[-1] == 'w' and (*path[:-1], 'qweight') in params:
            del out[path]
            for leaf in QUANTIZED_LEAVES:
                out[(*path[:-1], leaf)] = Quantized(source, leaf, spec.quantization.method)
    return out



def check_tensor_parallel(spec: ModelSpec, tp: int = 1) -> None:
    """ValueError naming the projection when its inputs do not fall in whole ``TILE_K``-row packed
    tiles and whole groups, on each of ``tp`` devices for the row-parallel ones (o: heads x
    head_dim, down: the intermediate size), which split their inputs."""
    if spec.quantization is None:
        return
    group = spec.quantization.group_size
    for name, k, parts in (('qkv and gate_up', spec.hidden_size, 1), ('o', spec.num_heads * spec.head_dim, tp),
                           ('down', spec.intermediate_size, tp)):
        if k % (parts * TILE_K) or (k // parts) % (group or k):
            raise ValueError(f"the 4-bit {name} projection's {k} inputs cannot be split in {parts} part(s) of whole "
                             f'{TILE_K}-row tiles and groups of {group or k}')
