"""The paged KV pool on the device: how many blocks fit, and the buffers the compiled step donates.

Besides every layer's K and V pages, the pool keeps the token id written at each KV slot, so the
on-device repetition penalty can read a session's history through its block table without the
host sending it every step; and the token last sampled for each running sequence, by the
sequence's row slot (``Sequence.slot``), so a call queued behind another one reads its inputs
there, on the device, in device order, without the host passing the earlier call's outputs on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from ..models.kv_cache import kv_bytes_per_block, kv_cache_leaves
from ..models.spec import ModelSpec
from ..parallel import rules

logger = logging.getLogger('lmdeploy_jax')

# Where the device reports no memory figures (the CPU), the pool holds this many tokens, or one
# full session if that is more.
HOST_DEFAULT_TOKENS = 8192


@jax.tree_util.register_dataclass
@dataclass
class CacheState:
    kv: tuple                               # K and V stacks, each [layers, kv_heads, num_blocks, block_size, head_dim]
                                            # (a kv_quant.QuantizedPages each under KV quantization)
    tokens: jax.Array                       # int32 [num_blocks * block_size]  token id at each KV slot
    last: jax.Array                         # int32 [row slots + 1]  last token sampled per row slot (the
                                            # extra entry takes the padding rows' writes)


@jax.tree_util.register_dataclass
@dataclass
class RowSlots:
    """Where a call's rows keep their last sampled token in ``CacheState.last`` (padding rows: the
    spare last entry), and which rows take their input token from there instead of the batch."""
    slot: jax.Array                         # int32 [B]
    from_device: jax.Array                  # bool  [B]


def free_device_bytes(device: jax.Device) -> int | None:
    """Bytes still free on ``device`` (weights already placed), or None where it does not say."""
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if not stats or 'bytes_limit' not in stats:
        return None
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)


def plan_num_blocks(spec: ModelSpec, block_size: int, session_len: int, cache_max_entry_count: float,
                    num_cache_blocks: int | None, device: jax.Device, kv_shards: int = 1,
                    quant_policy: int = 0) -> int:
    """Blocks in the pool (block 0, the padding target, included), and a log line saying what fits.
    ``device`` is the one with the least free memory; ``kv_shards`` devices share the KV heads,
    so a block takes that fraction of its KV bytes on each (sizes here are per device). A block's
    bytes are those ``quant_policy`` stores (``kv_cache.kv_bytes_per_block``), so quantized pages
    fit more blocks in the same ``cache_max_entry_count`` of free memory."""
    per_block = kv_bytes_per_block(spec, block_size, quant_policy) // kv_shards + 4 * block_size
    if num_cache_blocks is not None:
        num_blocks, why = num_cache_blocks, 'num_cache_blocks'
    else:
        free = free_device_bytes(device)
        if free is None:
            tokens = max(HOST_DEFAULT_TOKENS, session_len)
            num_blocks, why = -(-tokens // block_size) + 1, f'default of {tokens} tokens ({device.platform})'
        else:
            num_blocks = int(free * cache_max_entry_count) // per_block
            why = f'{cache_max_entry_count:.2f} x {free / 2**30:.2f} GiB free'
    if num_blocks < 2:
        raise ValueError(f'the KV pool fits only {num_blocks} blocks of {block_size} tokens ({why}); '
                         f'it needs at least 2')
    logger.info('KV pool: %d blocks x %d tokens = %d tokens, %.2f GiB, %s (%s)', num_blocks - 1, block_size,
                (num_blocks - 1) * block_size, num_blocks * per_block / 2**30,
                f'int{quant_policy} KV (quant_policy={quant_policy})' if quant_policy else f'{spec.dtype} KV', why)
    if (num_blocks - 1) * block_size < session_len:
        logger.warning('the KV pool (%d tokens) is smaller than session_len=%d: long sessions will fail',
                       (num_blocks - 1) * block_size, session_len)
    return num_blocks


def cache_state_spec(spec: ModelSpec, num_blocks: int, block_size: int, row_slots: int,
                     mesh: Mesh | None = None, quant_policy: int = 0) -> CacheState:
    """The pool's shapes, dtypes and shardings (``jax.ShapeDtypeStruct`` leaves) for ``row_slots``
    running sequences at most: the steps compile against these before the pool takes the device
    memory their compilation (autotuning) needs. ``quant_policy`` 8 or 4: K and V are
    ``QuantizedPages`` (``kv_cache.kv_cache_leaves``). With a mesh, every KV leaf splits over its
    heads (axis 1: the codes' and the scales' alike) and the token ids are replicated."""
    kv_sharding = NamedSharding(mesh, rules.KV_PAGES) if mesh is not None else None
    token_sharding = NamedSharding(mesh, rules.REPLICATED) if mesh is not None else None
    kv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=kv_sharding),
                      kv_cache_leaves(spec, num_blocks, block_size, quant_policy))
    return CacheState((kv, kv), jax.ShapeDtypeStruct((num_blocks * block_size,), jnp.int32, sharding=token_sharding),
                      jax.ShapeDtypeStruct((row_slots + 1,), jnp.int32, sharding=token_sharding))


def allocate_cache_state(state_spec: CacheState) -> CacheState:
    """A zeroed pool of ``state_spec``, each device allocating only its own shard."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), state_spec)
