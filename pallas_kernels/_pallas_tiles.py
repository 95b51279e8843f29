"""Pieces the Pallas (Triton) kernels share: the dtypes they take, and, for the attention kernels,
gathering a tile of K/V rows from the page pools, one online-softmax step over it, a decode split's
walk over its share of a row's tiles and its output, and loading a head rotated by rope.

A pool is viewed as ``[kv_heads, num_blocks * block_size, head_dim]``: position ``p`` of a row lives
at token row ``table[p // block_size] * block_size + p % block_size``. Each tile reads whole
``head_dim`` rows (16-byte vectors, coalesced within a page) and only the positions a mask allows,
so no byte outside a sequence's context (or outside a query's sliding window) is read. Scores stay
in the log2 domain (``Logits.log2``) so the exponentials are ``exp2``.

A sliding window reaches the kernels as an int32 ``[1]`` input (``window_of``; values <= 0: no
window): a query at position ``p`` sees keys ``window_start(window, p) <= k <= p``, and the tiles
wholly before the window are never visited.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .kv_quant import from_codes, is_quantized, nibble_columns, pack_int4, row_params, to_codes

LOG2E = math.log2(math.e)
MIN_DOT = 16                      # the smallest M, N and K of a Triton dot
# Float32 dots default to TF32 on the tensor cores (~1e-3 relative error); HIGHEST keeps them
# IEEE float32, which the float32 engine needs to match the PyTorch reference token for token.
# It changes nothing for 16-bit inputs.
EXACT = lax.Precision.HIGHEST
TRITON_FLOATS = (jnp.bfloat16, jnp.float16, jnp.float32)    # the input dtypes every kernel here takes
MAX_HEAD_DIM = 256              # the attention kernels' widest head (Gemma's): registers and shared memory
WIDEST_TUNED_HEAD = 128         # the launch knobs count positions of heads up to this wide


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def triton_supports(dtype, head_dim: int) -> bool:
    """What every attention kernel here needs: a 16/32-bit float dtype and a power-of-two head_dim
    of at least ``MIN_DOT`` (Triton tiles have power-of-two extents)."""
    return (dtype in TRITON_FLOATS
            and head_dim >= MIN_DOT and head_dim & (head_dim - 1) == 0)


def attention_unsupported(dtype, head_dim: int) -> str | None:
    """Why the attention kernels cannot take heads of ``dtype`` and ``head_dim``, or None if they
    can: ``triton_supports``, and at most ``MAX_HEAD_DIM`` wide."""
    if triton_supports(dtype, head_dim) and head_dim <= MAX_HEAD_DIM:
        return None
    return (f'{jnp.dtype(dtype).name} heads of {head_dim} elements: the attention kernels take bfloat16, '
            f'float16 or float32 heads whose head_dim is a power of two from {MIN_DOT} to {MAX_HEAD_DIM}')


def tile_for(tile_tokens: int, dtype, head_dim: int = WIDEST_TUNED_HEAD) -> int:
    """KV positions per tile: ``tile_tokens`` counts 16-bit positions of heads up to 128 wide;
    float32 tiles hold half as many, and wider heads (Gemma's 256) proportionally fewer, so a
    tile's bytes (and the pipeline's shared memory: ``num_stages`` K and V tiles) never exceed a
    16-bit 128-wide tile's."""
    narrow = min(1.0, WIDEST_TUNED_HEAD / head_dim)
    return max(MIN_DOT, int(tile_tokens * 2 // jnp.dtype(dtype).itemsize * narrow))


class Logits(NamedTuple):
    """How dot products ``q.k`` become the log2-domain scores of the online softmax: times
    ``scale``, then with ``soft_cap`` ``soft_cap * tanh(x / soft_cap)`` (Gemma 2), times log2(e)."""
    scale: float
    soft_cap: float | None = None

    def log2(self, dots):
        if self.soft_cap is None:
            return dots * (self.scale * LOG2E)
        return jnp.tanh(dots * (self.scale / self.soft_cap)) * (self.soft_cap * LOG2E)


def window_input(window):
    """A kernel's optional last input: the window (int32 scalar) as ``[1]`` (a free reshape), or
    nothing without one."""
    return [] if window is None else [window.reshape(1)]


def split_refs(refs, windowed: bool):
    """A kernel's refs after its fixed inputs as ``(window_ref or None, the rest)``: the
    ``window_input`` when ``windowed``, then the outputs."""
    return (refs[0], refs[1:]) if windowed else (None, refs)


def window_of(window_ref):
    """Inside a kernel: the sliding window of an int32 ``[1]`` input, or None without one."""
    return None if window_ref is None else window_ref[0]


def window_start(window, q_pos):
    """The first key position a query at ``q_pos`` (scalar or array) sees: 0, or with a window
    (int32 scalar, <= 0: none) ``q_pos - window + 1`` if that is positive."""
    if window is None:
        return 0
    return jnp.where(window > 0, jnp.maximum(q_pos - window + 1, 0), 0)


def in_span(pos, begin, end):
    """``begin <= pos < end`` (``begin`` the int 0 costs nothing)."""
    inside = pos < end
    return inside if isinstance(begin, int) and begin == 0 else inside & (pos >= begin)


def pool_rows(k_pages, v_pages, layer):
    """Layer-stacked pools ``[layers, kv_heads, num_blocks, block_size, d]`` as token rows
    ``[layers * kv_heads, num_blocks * block_size, d]`` (a free, row-major reshape; a quantized
    pool's codes and scale/zero each so), and the layer as int32 ``[1]`` (also free) for
    ``layer_head``: the kernels address (layer, KV head) themselves, so no XLA op runs before them
    to compute the row."""
    layers, kv_heads, num_blocks, block_size, _ = k_pages.shape

    def rows(pages):
        return jax.tree.map(lambda a: a.reshape(layers * kv_heads, num_blocks * block_size, a.shape[-1]), pages)
    return rows(k_pages), rows(v_pages), layer.astype(jnp.int32).reshape(1)


def pool_stacks(rows, like):
    """``pool_rows``' inverse for one pool: token rows back to the stacked shape of ``like``."""
    return jax.tree.map(lambda a, b: a.reshape(b.shape), rows, like)


def pool_outputs(*pools):
    """``out_shape`` entries for pools a kernel returns (updated in place): one per pool, of its
    shapes and dtypes (a ``QuantizedPages`` of them for a quantized pool)."""
    return [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), pools_) for pools_ in pools]


def pool_aliases(first_input: int, *pools) -> dict[int, int]:
    """``input_output_aliases`` for ``pools`` passed as a kernel's inputs from flat input index
    ``first_input`` on and returned as its first outputs (``pool_outputs``): each array (two per
    quantized pool) to its output."""
    return {first_input + i: i for i in range(len(jax.tree.leaves(pools)))}


def layer_head(layer_ref, kv_heads: int, h):
    """Inside a kernel: the pool row of KV head ``h`` of the layer in ``layer_ref`` (``pool_rows``)."""
    return layer_ref[0] * kv_heads + h


def load_kv_tile(tables_ref, k_ref, v_ref, b, h, pos, valid, block_size, start=None, dtype=None):
    """K and V rows ``[len(pos), head_dim]`` of row ``b``, KV head ``h`` at positions ``pos``
    (non-negative); rows where ``valid`` is False are zeros and are not read. Each position's page
    number is gathered from the table, unless the caller passes ``start``: then ``pos`` must be
    ``start + arange(len(pos))`` inside one page (``start`` a position the table covers: that
    load is unmasked), and the tile reads one page number, as a scalar, and its rows as one
    contiguous run, so no vector gather sits before the K/V loads (the jax_triton kernel's
    addressing). Quantized pools come back dequantized to ``dtype`` (``load_dequantized``);
    plain ones in their own dtype."""
    # pos >= 0, so C division (lax.div/rem) is floor division without the sign fix-ups.
    if start is None:
        page = plgpu.load(tables_ref.at[b, lax.div(pos, block_size)], mask=valid, other=0)
        rows = (page * block_size + lax.rem(pos, block_size))[:, None]
    else:
        page = tables_ref[b, lax.div(start, block_size)]
        rows = (page * block_size + lax.rem(start, block_size) + jnp.arange(pos.shape[0]))[:, None]
    if is_quantized(k_ref):
        return (load_dequantized(k_ref, h, rows, valid[:, None], dtype),
                load_dequantized(v_ref, h, rows, valid[:, None], dtype))
    cols = jnp.arange(k_ref.shape[-1])[None, :]
    k = plgpu.load(k_ref.at[h, rows, cols], mask=valid[:, None], other=0)
    v = plgpu.load(v_ref.at[h, rows, cols], mask=valid[:, None], other=0)
    return k, v


def load_dequantized(pages, h, rows, row_ok, dtype):
    """Rows ``rows [n, 1]`` of pool row ``h`` of a quantized pool (``pool_rows``), dequantized to
    ``dtype``: ``[n, head_dim]``. 4-bit codes are read straight from their packed bytes
    (``kv_quant.nibble_columns``). Rows where ``row_ok [n, 1]`` is False are zeros, not read."""
    head_dim = pages.shape[-1]
    if pages.bits == 4:
        cols, shift = nibble_columns(head_dim)
    else:
        cols = jnp.arange(head_dim)[None, :]
    codes = plgpu.load(pages.codes.at[h, rows, cols], mask=jnp.broadcast_to(row_ok, (rows.shape[0], head_dim)),
                       other=0)
    if pages.bits == 4:
        codes = (codes >> shift) & 15
    scale = plgpu.load(pages.scale_zero.at[h, rows, 0], mask=row_ok, other=0.0)
    zero = plgpu.load(pages.scale_zero.at[h, rows, 1], mask=row_ok, other=0.0)
    return from_codes(codes, scale, zero).astype(dtype)


def store_quantized(pages, h, slots, x, row_ok=None):
    """Quantize rows ``x [n, head_dim]`` (``kv_quant``'s arithmetic, in registers) and store
    their codes and scale/zero at token rows ``slots [n, 1]`` of pool row ``h`` of a quantized
    pool; only the rows where ``row_ok [n, 1]`` (None: all). Returns the rows as a read gives them
    back, dequantized to ``x``'s dtype. 4-bit codes are packed with ``lax.split``'s halves."""
    bits = pages.bits
    x32 = x.astype(jnp.float32)
    low, inv_scale, scale, zero = row_params(x32, bits)
    codes = to_codes(x32, low, inv_scale, bits)
    stored = pack_int4(codes) if bits == 4 else codes
    cols = jnp.arange(stored.shape[-1])[None, :]
    code_ok = None if row_ok is None else jnp.broadcast_to(row_ok, stored.shape)
    plgpu.store(pages.codes.at[h, slots, cols], stored, mask=code_ok)
    plgpu.store(pages.scale_zero.at[h, slots, 0], scale, mask=row_ok)
    plgpu.store(pages.scale_zero.at[h, slots, 1], zero, mask=row_ok)
    return from_codes(codes, scale, zero).astype(x.dtype)


def init_state(rows: int, head_dim: int):
    """(acc, running max, running sum) of an online softmax over no positions yet."""
    return (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_step(state, q, k, v, mask, logits: Logits):
    """Fold one tile into the state. A row may see no position of the tile (a window's edge):
    while its max is still -inf, its exponentials are taken from 0 instead, so they are 0, not
    NaN."""
    acc, m, l = state
    scores = logits.log2(plgpu.dot(q, k, trans_b=True, precision=EXACT))      # f32 [rows, tile]
    scores = jnp.where(mask, scores, -jnp.inf)
    m_new = jnp.maximum(m, scores.max(axis=1))
    m_from = jnp.where(m_new > -jnp.inf, m_new, 0.0)
    alpha = jnp.exp2(m - m_from)
    p = jnp.exp2(scores - m_from[:, None])
    l_new = l * alpha + p.sum(axis=1)
    acc_new = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=EXACT)
    return acc_new, m_new, l_new


def normalise(acc, l):
    """acc / l, with rows that saw no position (l == 0, acc == 0) left at zero."""
    return acc / jnp.where(l > 0, l, 1.0)[:, None]


def group_heads(h, group: int, group_pad: int):
    """The query heads of KV head ``h`` as ``group_pad`` matmul rows ``[group_pad, 1]`` (GQA), and
    which rows are real heads (the rest pad the group to a dot's size)."""
    lane = jnp.arange(group_pad)
    return (h * group + lane)[:, None], (lane < group)[:, None]


def split_tiles(s, span, tile: int, num_splits: int):
    """``(first, last)``: split ``s``'s share of the tiles that hold a row's positions
    ``span = (begin, end)``, dealt out evenly in order; trailing splits of a short row get none
    (``first >= last``)."""
    begin, end = span
    first_tile = lax.div(begin, tile) if not isinstance(begin, int) else begin // tile
    n_tiles = jnp.maximum(pl.cdiv(end, tile) - first_tile, 0)
    per_split = pl.cdiv(n_tiles, num_splits)
    first = first_tile + s * per_split
    return first, jnp.minimum(first + per_split, first_tile + n_tiles)


def attend_pages(state, q, tables_ref, k_ref, v_ref, b, pool_head, span, tiles, block_size, tile,
                 logits: Logits, page_tiles=False):
    """Fold tiles ``tiles = (first, last)`` of row ``b``'s cached positions ``span = (begin, end)``
    (``begin <= pos < end``; pool row ``pool_head``) into the online-softmax state of the queries
    ``q``. ``page_tiles``: address each tile by its one page (``load_kv_tile``'s ``start``) where
    every tile lies inside a page (``block_size`` a multiple of ``tile``); else, or when off, per
    position."""
    one_page = page_tiles and block_size % tile == 0

    def body(t, state):
        start = t * tile
        pos = start + jnp.arange(tile)
        valid = in_span(pos, *span)
        k, v = load_kv_tile(tables_ref, k_ref, v_ref, b, pool_head, pos, valid, block_size,
                            start if one_page else None, q.dtype)
        return softmax_step(state, q, k, v, valid[None, :], logits)

    return lax.fori_loop(*tiles, body, state)


def store_split(out_refs, state, b, s, heads, cols, head_ok):
    """Split ``s``'s result for query heads ``heads [rows, 1]`` of row ``b``. One output ref (the
    row is one split): the normalised output, in its dtype. Three: the unnormalised float32
    partial ``[B, splits, heads, d]`` and its running max and sum ``[B, splits, heads]``, which
    ``combine_splits`` merges."""
    acc, m, l = state
    if len(out_refs) == 1:
        (o_ref,) = out_refs
        plgpu.store(o_ref.at[b, heads, cols], normalise(acc, l).astype(o_ref.dtype), mask=head_ok)
        return
    o_ref, m_ref, l_ref = out_refs
    plgpu.store(o_ref.at[b, s, heads, cols], acc, mask=head_ok)
    plgpu.store(m_ref.at[b, s, heads[:, 0]], m, mask=head_ok[:, 0])
    plgpu.store(l_ref.at[b, s, heads[:, 0]], l, mask=head_ok[:, 0])


def load_rotated(ref, b, head, cols, cos, sin, mask):
    """Head rows ``ref[b, head, cols]`` of ``[B, heads, head_dim]`` rotated by rope (rotate-half
    form, as Hugging Face): ``x * cos + rotate_half(x) * sin``, ``rotate_half(x) = [-x2, x1]``
    for the halves ``x1, x2`` of head_dim. The halves are loaded a second time, swapped (column
    ``c`` reads ``c + head_dim / 2`` mod head_dim), so the rotation needs no shuffle of registers;
    the second load hits the cache. ``cos``/``sin``: ``[1, head_dim]`` in ``ref``'s dtype, the
    arithmetic in that dtype too, as the XLA rope does. Masked-off rows are zeros."""
    half = ref.shape[-1] // 2
    x = plgpu.load(ref.at[b, head, cols], mask=mask, other=0)
    swapped = plgpu.load(ref.at[b, head, lax.rem(cols + half, 2 * half)], mask=mask, other=0)
    return x * cos + jnp.where(cols < half, -swapped, swapped) * sin
