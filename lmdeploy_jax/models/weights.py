"""The params pytree of ``llama.py`` from a safetensors checkpoint: layers stacked, q/k/v and
gate/up fused, every weight put straight onto its device(s) in the target dtype, layer by layer.

Layout (Hugging Face ``[out, in]`` orientation, ``L`` layers; a ``'b'`` entry only where the
checkpoint has a bias, e.g. Qwen2's q/k/v; ``q_norm``/``k_norm`` only where ``spec.qk_norm``)::

    {'embed': [vocab, hidden], 'norm': [hidden], 'lm_head': {'w': [vocab, hidden]} (untied only),
     'layers': {'input_norm', 'post_norm': [L, hidden], 'q_norm', 'k_norm': [L, head_dim],
                'qkv': {'w': [L, (heads + 2 * kv_heads) * head_dim, hidden], 'b'?},
                'o': {'w': [L, hidden, heads * head_dim]},
                'gate_up': {'w': [L, 2 * intermediate, hidden]}, 'down': {'w': [L, hidden, intermediate]}}}

Fused rows are grouped by tensor-parallel shard (``FusedLayout``): shard ``s``'s q heads, then its
k heads, then its v heads (its gate rows, then its up rows), so splitting the rows evenly over
``tp`` devices gives each device whole pieces of each. With ``tp == 1`` this is plain
concatenation.

Why stacked: the model scans over layers, so a step traces and compiles one layer, not L (start-up
time). Why fused: one matmul reads q/k/v (gate/up) weights in one pass instead of three (two).
"""
from __future__ import annotations

import concurrent.futures
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ..checkpoint.errors import CheckpointError
from ..parallel import HeadSplit, param_spec
from .safetensors_file import SafetensorsCheckpoint
from .spec import ModelSpec

# params key -> the HF modules under ``model.layers.{i}.`` whose rows it holds, in order
FUSED = {'qkv': ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'),
         'gate_up': ('mlp.gate_proj', 'mlp.up_proj')}
PLAIN = {'o': 'self_attn.o_proj', 'down': 'mlp.down_proj'}
NORMS = {'input_norm': 'input_layernorm', 'post_norm': 'post_attention_layernorm'}
QK_NORMS = {'q_norm': 'self_attn.q_norm', 'k_norm': 'self_attn.k_norm'}     # per head, [head_dim] (Qwen3)
PREFETCH_LAYERS = 4      # layers read from disk and sent to the device ahead of the one being placed

ReadFn = Callable[[tuple[slice, ...]], np.ndarray]


@dataclass(frozen=True)
class FusedLayout:
    """Which checkpoint rows each tensor-parallel shard holds of each fused part. ``spec`` counts
    the checkpoint's KV heads; each is stored ``kv_replicas`` times where tp exceeds them."""
    spec: ModelSpec
    tp: int = 1
    kv_replicas: int = 1

    @property
    def stored_kv_heads(self) -> int:
        return self.spec.num_kv_heads * self.kv_replicas

    def shard_part_rows(self, part: str, shard: int) -> tuple[int, int]:
        """(first checkpoint row, row count) of ``part`` in shard ``shard``."""
        d = self.spec.head_dim
        if part == 'self_attn.q_proj':
            n = self.spec.num_heads // self.tp * d
            return shard * n, n
        if part in ('self_attn.k_proj', 'self_attn.v_proj'):
            local = self.stored_kv_heads // self.tp          # 1 whenever kv_replicas > 1
            return shard * local // self.kv_replicas * d, local * d
        n = self.spec.intermediate_size // self.tp
        return shard * n, n

    def segments(self, key: str) -> list[tuple[str, int, int]]:
        """The fused weight's rows in order, as (part, first checkpoint row, row count)."""
        return [(part, *self.shard_part_rows(part, s)) for s in range(self.tp) for part in FUSED[key]]

    def rows(self, key: str) -> int:
        return sum(n for _, _, n in self.segments(key))

    def shard_sizes(self, key: str) -> tuple[int, ...]:
        """Each part's rows within one shard, in order (the model splits a fused output by these)."""
        return tuple(self.shard_part_rows(part, 0)[1] for part in FUSED[key])


def _read_fused(ckpt: SafetensorsCheckpoint, prefix: str, segments, leaf: str, index: tuple[slice, ...]) -> np.ndarray:
    """Rows ``index[0]`` (and columns ``index[1:]``) of a fused weight or bias of one layer."""
    rows, rest = index[0], index[1:]
    lo, hi = rows.start or 0, rows.stop if rows.stop is not None else sum(n for _, _, n in segments)
    pieces, offset = [], 0
    for part, start, n in segments:
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            view = ckpt.view(f'{prefix}.{part}.{leaf}')
            pieces.append(view[(slice(start + a - offset, start + b - offset), *rest)])
        offset += n
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def expected_shapes(ckpt: SafetensorsCheckpoint, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor ``load_params`` reads, by name, as ``spec`` implies. A module's
    bias is expected in every layer when layer 0 has it (one fused part's bias: every part's)."""
    d, hidden, inter = spec.head_dim, spec.hidden_size, spec.intermediate_size
    rows = {'self_attn.q_proj': spec.num_heads * d, 'self_attn.k_proj': spec.num_kv_heads * d,
            'self_attn.v_proj': spec.num_kv_heads * d, 'mlp.gate_proj': inter, 'mlp.up_proj': inter}
    cols = {'self_attn.o_proj': spec.num_heads * d, 'mlp.down_proj': inter}
    layer = {f'{m}.weight': (n, hidden) for m, n in rows.items()}
    layer.update({f'{m}.weight': (hidden, n) for m, n in cols.items()})
    layer.update({f'{m}.weight': (hidden,) for m in NORMS.values()})
    if spec.qk_norm:
        layer.update({f'{m}.weight': (d,) for m in QK_NORMS.values()})
    for parts in FUSED.values():
        if f'model.layers.0.{parts[0]}.bias' in ckpt:
            layer.update({f'{m}.bias': (rows[m],) for m in parts})
    layer.update({f'{m}.bias': (hidden,) for m in PLAIN.values() if f'model.layers.0.{m}.bias' in ckpt})
    shapes = {f'model.layers.{i}.{name}': shape for i in range(spec.num_layers) for name, shape in layer.items()}
    shapes.update({'model.embed_tokens.weight': (spec.vocab_size, hidden), 'model.norm.weight': (hidden,)})
    if not spec.tie_word_embeddings:
        shapes['lm_head.weight'] = (spec.vocab_size, hidden)
    return shapes


def check_tensors(ckpt: SafetensorsCheckpoint, spec: ModelSpec, config_path: str) -> None:
    """CheckpointError naming the weights file when a tensor the config (``config_path``) implies
    is missing or has another shape."""
    for name, shape in expected_shapes(ckpt, spec).items():
        if name not in ckpt:
            raise CheckpointError(ckpt.location, f'tensor {name!r} is missing (expected from {config_path})')
        if ckpt.shape(name) != shape:
            raise CheckpointError(ckpt.file_of(name), f'tensor {name!r} has shape {ckpt.shape(name)}, but '
                                                      f'{config_path} implies {shape}')


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _ordered_prefetch(make: Callable[[int], jax.Array], n: int, pool) -> Iterator[jax.Array]:
    """``make(0) .. make(n - 1)`` in order, each started up to ``PREFETCH_LAYERS`` ahead."""
    pending = [pool.submit(make, i) for i in range(min(n, PREFETCH_LAYERS))]
    for i in range(n):
        if i + PREFETCH_LAYERS < n:
            pending.append(pool.submit(make, i + PREFETCH_LAYERS))
        yield pending[i].result()


class _Placer:
    """Puts arrays where they belong in the target dtype: on the default device, or shard by shard
    over the mesh, each device receiving only its own piece (read from the file for it)."""

    def __init__(self, dtype, mesh: Mesh | None, pool: concurrent.futures.Executor):
        self.dtype, self.mesh, self.pool = dtype, mesh, pool

    def _sharding(self, spec: PartitionSpec):
        return NamedSharding(self.mesh, spec) if self.mesh is not None else SingleDeviceSharding(jax.devices()[0])

    def array(self, shape: tuple[int, ...], spec: PartitionSpec, read: ReadFn) -> jax.Array:
        return jax.make_array_from_callback(shape, self._sharding(spec),
                                            lambda index: np.asarray(read(index), self.dtype))

    def stacked(self, layers: int, shape: tuple[int, ...], spec: PartitionSpec,
                read_layer: Callable[[int, tuple[slice, ...]], np.ndarray]) -> jax.Array:
        """``[layers, *shape]`` built in place on the device(s), one layer at a time (the host
        never holds more than a few layers; the device one stack plus a few layers)."""
        stack = jnp.zeros((layers, *shape), self.dtype, device=self._sharding(PartitionSpec(None, *spec)))
        make = lambda i: self.array(shape, spec, functools.partial(read_layer, i))  # noqa: E731
        for i, layer in enumerate(_ordered_prefetch(make, layers, self.pool)):
            stack = _set_layer(stack, layer, np.int32(i))
        return stack


def load_params(ckpt: SafetensorsCheckpoint, spec: ModelSpec, mesh: Mesh | None = None,
                split: HeadSplit | None = None) -> dict:
    """Build the params pytree; biases are loaded wherever the checkpoint has them. With a mesh,
    ``split`` says how its devices share the heads."""
    tp = mesh.size if mesh is not None else 1
    layout = FusedLayout(spec, tp, split.kv_replicas if split is not None else 1)
    L, hidden = spec.num_layers, spec.hidden_size
    with concurrent.futures.ThreadPoolExecutor(PREFETCH_LAYERS) as pool:
        place = _Placer(spec.dtype, mesh, pool)

        def stacked(key: str, leaf: str | None, shape: tuple[int, ...], read_layer) -> jax.Array:
            return place.stacked(L, shape, param_spec(key, leaf, shape, tp), read_layer)

        def whole(key: str, name: str, leaf: str | None = None) -> jax.Array:
            shape = ckpt.shape(name)
            return place.array(shape, param_spec(key, leaf, shape, tp), lambda index: ckpt.view(name)[index])

        layers = {}
        for key in FUSED:
            segments = layout.segments(key)
            rows = layout.rows(key)
            for leaf, shape in (('weight', (rows, hidden)), ('bias', (rows,))):
                if leaf == 'bias' and f'model.layers.0.{FUSED[key][0]}.bias' not in ckpt:
                    continue
                read = lambda i, index, leaf=leaf, segments=segments: _read_fused(  # noqa: E731
                    ckpt, f'model.layers.{i}', segments, leaf, index)
                layers.setdefault(key, {})[leaf[0]] = stacked(key, leaf[0], shape, read)
        for key, module in PLAIN.items():
            for leaf in ('weight', 'bias'):
                name = f'model.layers.0.{module}.{leaf}'
                if name in ckpt:
                    read = lambda i, index, m=module, leaf=leaf: ckpt.view(f'model.layers.{i}.{m}.{leaf}')[index]  # noqa: E731
                    layers.setdefault(key, {})[leaf[0]] = stacked(key, leaf[0], ckpt.shape(name), read)
        norms = {**NORMS, **(QK_NORMS if spec.qk_norm else {})}
        for key, module in norms.items():
            size = spec.head_dim if key in QK_NORMS else hidden
            layers[key] = stacked(key, None, (size,),
                                  lambda i, index, m=module: ckpt.view(f'model.layers.{i}.{m}.weight')[index])
        params = {'embed': whole('embed', 'model.embed_tokens.weight'), 'layers': layers,
                  'norm': whole('norm', 'model.norm.weight')}
        if not spec.tie_word_embeddings:
            params['lm_head'] = {'w': whole('lm_head', 'lm_head.weight', 'w')}
    return params
