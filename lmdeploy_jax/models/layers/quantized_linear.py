"""A 4-bit (W4A16) projection for AWQ/GPTQ checkpoints: the codes stay packed on the device and
the matmul dequantizes them in registers (``pallas_kernels.w4a16``).

``make_linear`` is what the attention and MLP layers build: a ``Linear`` for a float checkpoint, a
``QuantizedLinear`` when ``spec.quantization`` says the checkpoint is quantized. Its parameters are
not Hugging Face's ``[out, in]`` weight but, per layer, ``qweight`` int32 ``[in // 8, out]`` (the
tile layout of ``pallas_kernels.w4a16.layout``), ``scales`` and ``zeros`` float16 ``[groups, out]``;
a fused one (qkv, gate_up) has its parts side by side along ``out``, laid out shard by shard as the
float one's rows are (``fused.py``). ``quantized_weight_map`` turns a family's float weight map into
the map of these parameters, so a family needs no change to load AWQ/GPTQ weights. Over a mesh
the 4-bit matmuls run per device under ``shard_map`` (``project_columns`` here for qkv and gate_up,
``row_parallel`` for o and down), since XLA cannot partition the Pallas kernel's call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pallas_kernels.w4a16.layout import NIBBLES, layout_tile

from ...parallel import rules
from ..row_parallel import per_device
from ..spec import ModelSpec
from ..weight_map import Path, Quantized, Source
from .linear import Linear, _leading, layer_weights, linear

QUANTIZED_LEAVES = rules.QUANTIZED_LEAVES     # qweight, scales, zeros
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
        return layer_weights(p, index)

    def __call__(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        return linear(x, self.weights(index))


def make_linear(spec: ModelSpec, layers: int | None, out_features: int, in_features: int, *, bias: bool,
                rngs: nnx.Rngs) -> Linear | QuantizedLinear:
    """The projection of a decoder layer's attention or MLP: 4-bit when ``spec.quantization`` is set."""
    if spec.quantization is None:
        return Linear(layers, out_features, in_features, spec.dtype, bias=bias, rngs=rngs)
    return QuantizedLinear(layers, out_features, in_features, spec.quantization.groups(in_features), spec.dtype,
                           bias=bias)


def project_columns(layer: Linear | QuantizedLinear, x: jax.Array, index: jax.Array, mesh: Mesh | None) -> jax.Array:
    """``layer(x, index)`` of a column-parallel projection (qkv, gate_up) of ``x [B, T, in]``: a
    4-bit one over a mesh runs on each device's own output columns under ``shard_map`` (XLA cannot
    partition the Pallas kernel's call, and would gather the weights to every device); a float one
    as XLA partitions it."""
    if mesh is None or isinstance(layer, Linear):
        return layer(x, index)
    p = layer.weights(index)
    keys = tuple(p)
    specs = tuple(rules.COLUMN_BIAS if k == 'b' else rules.QUANTIZED_COLUMNS for k in keys)
    fn = per_device(lambda x, *leaves: linear(x, dict(zip(keys, leaves))), mesh,
                    in_specs=(rules.REPLICATED, *specs), out_specs=rules.COLUMN_OUTPUT)
    return fn(x, *p.values())


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
    """ValueError naming the projection when its inputs do not fall in whole groups and whole
    packed tiles (``pallas_kernels.w4a16.layout.layout_tile``), on each of ``tp`` devices for the
    row-parallel ones (o: heads x head_dim, down: the intermediate size), which split their inputs."""
    if spec.quantization is None:
        return
    group = spec.quantization.group_size
    for name, k, parts in (('qkv and gate_up', spec.hidden_size, 1), ('o', spec.num_heads * spec.head_dim, tp),
                           ('down', spec.intermediate_size, tp)):
        tile = layout_tile(k) if k % NIBBLES == 0 else 0
        if not tile or k % parts or (k // parts) % tile or (k // parts) % (group or k):
            raise ValueError(f"the 4-bit {name} projection's {k} inputs cannot be split in {parts} part(s) of whole "
                             f'packed tiles ({tile or NIBBLES} rows) and groups of {group or k}')
