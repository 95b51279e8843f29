"""Dense building blocks of the attention references: gather each sequence's pages into one
contiguous array, then a masked softmax attention in float32. Obvious rather than fast, but the
pages gathered are those of the table's narrowest width (of a few fixed ones) that holds the
step's longest context (``over_context``), not the whole session's table."""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# The block-table widths the references choose among (``context_widths``): the whole table, then
# quarters of the one before while they hold at least MIN_WIDTH_POSITIONS positions.
WIDTH_FACTOR = 4
MIN_WIDTH_POSITIONS = 128


def gather_pages(pages: jax.Array, block_tables: jax.Array, layer: jax.Array) -> jax.Array:
    """Layer ``layer`` of ``[layers, kv_heads, num_blocks, block_size, d]`` and ``[B, M]`` ->
    ``[B, kv_heads, M * block_size, d]``, position ``p`` of row ``b`` at index ``p``. One gather
    of the rows' pages: slicing the layer out first would copy its whole pool."""
    _, kv_heads, _, block_size, d = pages.shape
    batch, max_blocks = block_tables.shape
    rows = pages[layer, :, block_tables]                # [B, M, kv_heads, block_size, d]
    return rows.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, max_blocks * block_size, d)


def context_widths(max_blocks: int, block_size: int) -> tuple[int, ...]:
    """The block-table widths ``over_context`` chooses among for a table of ``max_blocks`` blocks
    of ``block_size`` positions, ascending: ``max_blocks``, then each width divided by
    ``WIDTH_FACTOR`` (rounded up) while it holds at least ``MIN_WIDTH_POSITIONS`` positions. Each
    width is a branch compiled into every step, so short tables keep the one."""
    widths = [max_blocks]
    while widths[-1] > 1 and -(-widths[-1] // WIDTH_FACTOR) * block_size >= MIN_WIDTH_POSITIONS:
        widths.append(-(-widths[-1] // WIDTH_FACTOR))
    return tuple(reversed(widths))


def over_context(attend: Callable[[jax.Array], jax.Array], block_tables: jax.Array, context_lens: jax.Array,
                 block_size: int) -> jax.Array:
    """``attend(block_tables[:, :w])`` for the narrowest width ``w`` of ``context_widths`` whose
    ``w * block_size`` positions hold every row's context (``max(context_lens)``), so a step's work
    follows its longest context rather than the session's length. ``attend`` must give the same
    result for any width that holds the contexts (the positions past a row's context are masked
    out): one ``lax.switch`` over the widths, a single executable, differentiable like its branches.

    ``block_tables`` int32 ``[B, M]``, ``context_lens`` int32 ``[B]``; returns what ``attend`` does
    (the same shape and dtype for every width)."""
    widths = context_widths(block_tables.shape[1], block_size)
    if len(widths) == 1:
        return attend(block_tables)
    needed = (jnp.max(context_lens) + block_size - 1) // block_size
    index = jnp.sum(jnp.asarray(widths[:-1], jnp.int32) < needed)        # the first width >= needed, else the last
    return jax.lax.switch(index, [functools.partial(_attend_width, attend, block_tables, w) for w in widths])


def _attend_width(attend, block_tables, width):
    return attend(block_tables[:, :width])


def causal_window_mask(q_pos: jax.Array, num_keys: int, window: jax.Array | None) -> jax.Array:
    """Which of key positions ``0 .. num_keys - 1`` the queries at positions ``q_pos`` int32
    ``[B, T]`` see -> bool ``[B, T, num_keys]``: ``k <= p``, and with a ``window`` (int32 scalar;
    values <= 0: none) also ``k > p - window``, Hugging Face's ``sliding_window`` convention."""
    k = jnp.arange(num_keys)[None, None, :]
    p = q_pos[:, :, None]
    mask = k <= p
    if window is None:
        return mask
    return mask & ((window <= 0) | (k > p - window))


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                     soft_cap: float | None = None) -> jax.Array:
    """Softmax attention with grouped-query heads; rows whose mask is all False return zeros.

    q ``[B, T, heads, d]``; k, v ``[B, kv_heads, S, d]``; mask bool ``[B, T, S]`` -> ``[B, T, heads, d]``
    in q's dtype. Query head ``h`` reads KV head ``h // (heads // kv_heads)``, as in Hugging Face.
    Scores are ``q.k * scale``, then with ``soft_cap`` ``soft_cap * tanh(scores / soft_cap)``
    (Gemma 2's attention soft-capping), before the mask and the softmax.
    """
    batch, tokens, heads, d = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, tokens, kv_heads, heads // kv_heads, d).astype(jnp.float32)
    scores = jnp.einsum('btkgd,bksd->bkgts', qg, k.astype(jnp.float32)) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    m = mask[:, None, None]                              # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(m, scores, jnp.finfo(jnp.float32).min), axis=-1)
    probs = jnp.where(m.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum('bkgts,bksd->btkgd', probs, v.astype(jnp.float32))
    return out.reshape(batch, tokens, heads, d).astype(q.dtype)
