"""Fused projections: q/k/v in one ``qkv`` weight, gate/up in one ``gate_up``, their rows grouped
by tensor-parallel shard: shard ``s``'s q heads, then its k heads, then its v heads (its gate rows,
then its up rows), so splitting the rows evenly over ``tp`` devices gives each device whole pieces
of each. With ``tp == 1`` this is plain concatenation, and so is a mixture of experts' ``gate_up``
under expert parallelism (``ModelSpec.expert_parallel``: each device holds whole experts). One
matmul then reads the q/k/v (gate/up) weights in one pass instead of three (two)."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..spec import ModelSpec

# fused parameter -> its parts, in row order within a shard
FUSED = {'qkv': ('q', 'k', 'v'), 'gate_up': ('gate', 'up'), 'shared_gate_up': ('shared_gate', 'shared_up')}


@dataclass(frozen=True)
class FusedLayout:
    """Which logical rows of each part each tensor-parallel shard holds. ``spec`` counts the
    checkpoint's KV heads; each is stored ``kv_replicas`` times where tp exceeds them."""
    spec: ModelSpec
    tp: int = 1
    kv_replicas: int = 1

    @property
    def stored_kv_heads(self) -> int:
        return self.spec.num_kv_heads * self.kv_replicas

    def shards(self, key: str) -> int:
        """How many shards the fused weight ``key``'s rows are grouped in: ``tp``, but 1 for the
        experts' ``gate_up`` under expert parallelism (the mesh splits the experts instead)."""
        return 1 if key == 'gate_up' and self.spec.expert_parallel else self.tp

    def shard_part_rows(self, part: str, shard: int) -> tuple[int, int]:
        """(first logical row, row count) of ``part`` ('q', 'k', 'v', 'gate', 'up', 'shared_gate',
        'shared_up': a mixture of experts' shared expert) in shard ``shard``."""
        if part in FUSED['gate_up'] and self.spec.expert_parallel:
            return 0, self.spec.intermediate_size
        d = self.spec.head_dim
        if part == 'q':
            n = self.spec.num_heads // self.tp * d
            return shard * n, n
        if part in ('k', 'v'):
            local = self.stored_kv_heads // self.tp          # 1 whenever kv_replicas > 1
            return shard * local // self.kv_replicas * d, local * d
        size = self.spec.shared_expert_size if part.startswith('shared_') else self.spec.intermediate_size
        n = size // self.tp
        return shard * n, n

    def segments(self, key: str) -> list[tuple[int, int, int]]:
        """The fused weight's rows in order, as (part index in ``FUSED[key]``, first logical row, count)."""
        return [(p, *self.shard_part_rows(part, s)) for s in range(self.shards(key))
                for p, part in enumerate(FUSED[key])]

    def rows(self, key: str) -> int:
        return sum(n for _, _, n in self.segments(key))

    def shard_sizes(self, key: str) -> tuple[int, ...]:
        """Each part's rows within one shard, in order (the model splits a fused output by these)."""
        return tuple(self.shard_part_rows(part, 0)[1] for part in FUSED[key])


def split_fused(y: jax.Array, layout: FusedLayout, key: str) -> list[jax.Array]:
    """Undo the shard-by-shard row grouping of the fused projection ``key``'s output
    ``[..., tp * sum(sizes)]``: one ``[..., tp * size]`` per part (shard 0's piece first), so heads
    keep their global order."""
    sizes = layout.shard_sizes(key)
    grouped = y.reshape(*y.shape[:-1], layout.shards(key), sum(sizes))
    pieces = jnp.split(grouped, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    return [p.reshape(*y.shape[:-1], -1) for p in pieces]


def join_fused(parts: list[jax.Array], layout: FusedLayout, key: str) -> jax.Array:
    """``split_fused``'s inverse: the parts ``[..., tp * size]`` back in the shard-by-shard layout."""
    grouped = [p.reshape(*p.shape[:-1], layout.shards(key), -1) for p in parts]
    joined = jnp.concatenate(grouped, axis=-1)
    return joined.reshape(*joined.shape[:-2], -1)
