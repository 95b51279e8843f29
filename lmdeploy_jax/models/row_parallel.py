"""Where a decoder layer's row-parallel projections (o, down) meet the residual stream: the sum over
the tensor-parallel devices, the residual add and the RMSNorm after each. ``for_step`` picks one of
two forms per traced step; the token embeddings enter in that form (added by the first layer's first
norm), and the layer loop carries the MLP's output in it to the next layer's first norm (and the
last layer's to the final norm).

- ``ReducedSums`` (no mesh, or a large step): XLA partitions o/down from the params' shardings and
  all-reduces their outputs; the add and norm (``add_rms_norm``) run on each device's full copy.
- ``PartialSums`` (a mesh and a step of at most ``PARTIAL_SUMS_MAX_BYTES`` of hidden states a
  device, e.g. a batch-1 decode step): o/down run under ``shard_map`` and leave each device's
  partial product unsummed, stacked ``[tp, ...]``; the ``reduce_add_rms_norm`` op sums, adds and
  normalises in one call. On the GPUs of one process that is one kernel a CUDA graph can hold,
  where XLA's all-reduce thunks split a small step into many host launches; elsewhere it is XLA's
  all-reduce and ``add_rms_norm``, as in ``ReducedSums``.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pallas_kernels.reduce_add_rms_norm.api import KERNEL_MAX_BYTES, reduce_add_rms_norm
from pallas_kernels.rms_norm.api import add_rms_norm, rms_norm

from ..parallel import rules
from .layers.linear import linear
from .spec import ModelSpec

PARTIAL_SUMS_MAX_BYTES = KERNEL_MAX_BYTES        # what the kernel's staging slots hold


def per_device(fn, mesh: Mesh | None, in_specs: tuple, out_specs: tuple):
    """``fn`` under ``shard_map`` over the tensor-parallel mesh (each device on its own shards), or
    as is without one."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, check_vma=False, in_specs=in_specs, out_specs=out_specs)


@dataclass(frozen=True)
class ReducedSums:
    spec: ModelSpec
    mesh: Mesh | None

    def embed(self, table: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The token embeddings as ``(x, zeros)``; a table split over the vocabulary is looked up
        shard by shard and the shares summed (an all-reduce of the embeddings, not an all-gather
        of the table; see ``vocab_shard_lookup``)."""
        partial = vocab_shard_lookup(self.mesh, table, ids)
        x = table[ids] if partial is None else partial.sum(axis=0)
        return x, jnp.zeros_like(x)

    def project(self, x: jax.Array, p: dict) -> jax.Array:
        """``linear(x, p)``, summed over the devices by XLA; 4-bit weights (which XLA cannot
        partition the Pallas kernel's call over) on each device's own input rows under
        ``shard_map``, the bias added after the sum."""
        if self.mesh is None or 'qweight' not in p:
            return linear(x, p)
        weights = {k: v for k, v in p.items() if k != 'b'}
        keys = tuple(weights)
        y = self.sum_of_shares(lambda x, *leaves: linear(x, dict(zip(keys, leaves))),
                               (rules.ROW_INPUT, *(rules.row_weight_spec(k) for k in keys)), x, *weights.values())
        return y + p['b'] if 'b' in p else y

    def sum_of_shares(self, fn, in_specs: tuple, *args) -> jax.Array:
        """``fn(*args)`` run on each device's shards (``in_specs``), whose result is that device's
        share of a sum (a row-parallel product), summed over the devices."""
        if self.mesh is None:
            return fn(*args)
        return per_device(lambda *a: jax.lax.psum(fn(*a), rules.TP), self.mesh, in_specs=in_specs,
                          out_specs=rules.REPLICATED)(*args)

    def add_norm(self, x: jax.Array, y: jax.Array, weight: jax.Array,
                 layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(x + y, its RMSNorm)`` in one op (one kernel on a GPU). ``weight``: ``[hidden]``, or every
        layer's ``[layers, hidden]`` with ``layer`` the one to use (read in place: a slice would be a
        copy per norm). With a mesh each device works on its full copy of the replicated hidden
        states, under ``shard_map`` since XLA cannot partition the kernel's custom call."""
        r = rules.REPLICATED
        add_norm = per_device(lambda x, y, w, i: add_rms_norm(x, y, w, self.spec.rms_norm_eps, i), self.mesh,
                              in_specs=(r, r, r, r), out_specs=(r, r))
        return add_norm(x, y, weight, layer)

    def norm(self, x: jax.Array, weight: jax.Array, layer: jax.Array | None = None) -> jax.Array:
        """The RMSNorm of ``x`` alone (a sandwich norm's post norm), ``weight``/``layer`` as in
        ``add_norm``."""
        r = rules.REPLICATED
        return per_device(lambda x, w, i: rms_norm(x, w, self.spec.rms_norm_eps, i), self.mesh,
                          in_specs=(r, r, r), out_specs=r)(x, weight, layer)


@dataclass(frozen=True)
class PartialSums:
    spec: ModelSpec
    mesh: Mesh
    kernel_devices: tuple | None = None      # the mesh's devices where the CUDA kernel was prepared

    def embed(self, table: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The token embeddings as ``(zeros, partial)``: each device's share of the lookup
        (``vocab_shard_lookup``), summed by the first layer's first norm."""
        partial = vocab_shard_lookup(self.mesh, table, ids)
        if partial is None:
            x = table[ids]
            return x, jnp.zeros((self.mesh.size, *x.shape), x.dtype)
        return jnp.zeros(partial.shape[1:], table.dtype), partial

    def project(self, x: jax.Array, p: dict) -> jax.Array:
        """Each device's partial product ``[1, B, T, out]`` of ``x [B, T, in]`` (its columns) and its
        columns of the weight (its rows, of 4-bit weights); a bias joins the first device's share,
        so the sum has it once."""
        keys = tuple(p)

        def partial(x, *leaves):
            own = dict(zip(keys, leaves))
            if 'b' in own:
                own['b'] = jnp.where(jax.lax.axis_index(rules.TP) == 0, own['b'], jnp.zeros_like(own['b']))
            return linear(x, own)[None]
        return per_device(partial, self.mesh, in_specs=(rules.ROW_INPUT, *(rules.row_weight_spec(k) for k in keys)),
                          out_specs=rules.PARTIAL_SUMS)(x, *p.values())

    def sum_of_shares(self, fn, in_specs: tuple, *args) -> jax.Array:
        """``ReducedSums.sum_of_shares``, each device's share left unsummed, stacked ``[tp, ...]``."""
        return per_device(lambda *a: fn(*a)[None], self.mesh, in_specs=in_specs,
                          out_specs=rules.PARTIAL_SUMS)(*args)

    def add_norm(self, x: jax.Array, partial: jax.Array, weight: jax.Array,
                 layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``ReducedSums.add_norm`` of ``x`` and the sum of ``partial``'s shares."""
        r = rules.REPLICATED
        def reduce(partial, x, weight, layer):
            return reduce_add_rms_norm(partial[0], x, weight, self.spec.rms_norm_eps, layer, axis_name=rules.TP,
                                       devices=self.kernel_devices)
        fn = per_device(reduce, self.mesh, in_specs=(rules.PARTIAL_SUMS, r, r, r), out_specs=(r, r))
        return fn(partial, x, weight, layer)


def vocab_shard_lookup(mesh: Mesh | None, table: jax.Array, ids: jax.Array) -> jax.Array | None:
    """Each device's share of ``table[ids]``, stacked ``[tp, *ids.shape, hidden]``, when the table
    is split over the vocabulary (``rules.param_spec``; None otherwise): its own rows' embeddings
    and zeros for the other devices' ids, so the shares sum exactly to the embeddings: an
    all-reduce of the embeddings, where XLA's own partitioning of the lookup all-gathers the whole
    table in every step."""
    if mesh is None or table.shape[0] % mesh.size:
        return None
    rows = table.shape[0] // mesh.size

    def lookup(shard, ids):
        local = ids - jax.lax.axis_index(rules.TP) * rows
        mine = (local >= 0) & (local < rows)
        return jnp.where(mine[..., None], shard[jnp.clip(local, 0, rows - 1)], jnp.zeros((), shard.dtype))[None]
    return per_device(lookup, mesh, in_specs=(rules.VOCAB_ROWS, rules.REPLICATED), out_specs=rules.PARTIAL_SUMS)(
        table, ids)


def for_step(spec: ModelSpec, mesh: Mesh | None, tokens: tuple[int, ...], dtype,
             kernel: bool, partial_sums: bool = True) -> ReducedSums | PartialSums:
    """``PartialSums`` for a tensor-parallel step of ``tokens`` (the ids' shape) whose hidden states
    in ``dtype`` are small enough, else ``ReducedSums``. ``kernel``: the CUDA kernel was prepared
    for the mesh's devices (``models/loader.py``). ``partial_sums`` False: always ``ReducedSums``,
    for a layer that norms a projection's output by itself (a sandwich norm), which needs the
    full sum first."""
    nbytes = int(np.prod(tokens)) * spec.hidden_size * jnp.dtype(dtype).itemsize
    if partial_sums and mesh is not None and mesh.size > 1 and nbytes <= PARTIAL_SUMS_MAX_BYTES:
        return PartialSums(spec, mesh, tuple(mesh.devices.flat) if kernel else None)
    return ReducedSums(spec, mesh)
