"""The ops' XLA references (through their ``api.py``; the decode step's attention through its own
reference function) against a dense float64 numpy computation:
each sequence's KV contiguous, a plain masked softmax per query. Random inputs, random
non-contiguous block tables, ragged lengths, several block sizes and GQA ratios; sliding windows
(Hugging Face's mask, written out) shorter than a page, longer than a page, of one position, and
soft-capped scores (Gemma 2's formula), on contexts longer than the window. The decode step's
reference must also be, bit for bit, the separate ops' path (rope, KV write, decode attention,
each op's own reference). The attention references on tables wider than the contexts, where they
gather only the narrowest width that holds them, against the whole table's result and the dense one,
values and gradients. RMSNorm's reference against the float64 formula, rounded where Hugging Face's
rounds."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmdeploy_jax.models.rope import apply_rope, cos_sin
from pallas_kernels._dense import causal_window_mask, context_widths, gather_pages, masked_attention
from pallas_kernels.decode_step_attention.api import decode_step_attention
from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.kv_write.reference import write_kv_reference
from pallas_kernels.decode_step_attention.reference import paged_decode_attention_reference
from pallas_kernels.prefill_attention.api import paged_prefill_attention
from pallas_kernels.rms_norm.api import rms_norm

KV_HEADS, HEAD_DIM = 2, 32
SCALE = HEAD_DIM ** -0.5


class PagedSequences:
    """Random contiguous K/V per sequence, scattered into random (garbage-filled) pools behind
    random, non-contiguous block tables."""

    def __init__(self, rng, context_lens, block_size, table_blocks=None):
        """``table_blocks``: the tables' width (default: the longest context's blocks), each row's
        blocks past its context holding garbage too."""
        self.context_lens = np.asarray(context_lens, np.int32)
        max_blocks = table_blocks or max(1, -(-int(self.context_lens.max()) // block_size))
        num_blocks = 1 + len(context_lens) * max_blocks + 2
        shape = (KV_HEADS, num_blocks, block_size, HEAD_DIM)
        self.k_pages, self.v_pages = (rng.standard_normal(shape, np.float32) for _ in range(2))
        free = rng.permutation(np.arange(1, num_blocks))
        self.block_tables = np.zeros((len(context_lens), max_blocks), np.int32)
        self.k, self.v = [], []    # per sequence [ctx, kv_heads, d]
        for b, n in enumerate(self.context_lens):
            self.block_tables[b] = free[b * max_blocks:(b + 1) * max_blocks]
            k, v = (rng.standard_normal((n, KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
            pos = np.arange(n)
            blocks = self.block_tables[b, pos // block_size]
            self.k_pages[:, blocks, pos % block_size] = k.transpose(1, 0, 2)
            self.v_pages[:, blocks, pos % block_size] = v.transpose(1, 0, 2)
            self.k.append(k)
            self.v.append(v)

    def args(self):
        return tuple(map(jnp.asarray, (self.k_pages, self.v_pages, self.block_tables, self.context_lens)))


def decode_attention(q, k_pages, v_pages, block_tables, context_lens, scale, sliding_window=None,
                     logits_soft_cap=None):
    """The decode step's attention reference on one layer's pools (``sliding_window`` an int or
    traced int32 scalar, 0/None: none)."""
    window = None if sliding_window is None else jnp.asarray(sliding_window, jnp.int32)
    return paged_decode_attention_reference(q, k_pages[None], v_pages[None], jnp.int32(0), block_tables,
                                            context_lens, scale, window, logits_soft_cap)


def dense_attention(q, k, v, mask=None, soft_cap=None):
    """q ``[heads, d]`` over the keys of k, v ``[n, kv_heads, d]`` where ``mask`` bool ``[n]``
    (default: all; at least one) in float64 -> ``[heads, d]``. With ``soft_cap``, Gemma 2's
    eager attention: scores ``q.k * scale``, divided by the cap, tanh, times the cap, then masked."""
    group = q.shape[0] // k.shape[1]
    mask = np.ones(len(k), bool) if mask is None else mask
    out = np.zeros(q.shape)
    for h in range(q.shape[0]):
        s = (k[:, h // group].astype(np.float64) @ q[h].astype(np.float64)) * SCALE
        if soft_cap is not None:
            s = np.tanh(s / soft_cap) * soft_cap
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[:, h // group]
    return out


def assert_close(ours, expected):
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=2e-5)


def hf_mask(num_keys, q_idx, sliding_window):
    """Hugging Face's mask of a query at ``q_idx`` over keys ``0 .. num_keys - 1``: causal
    (``kv_idx <= q_idx``), and with a window ``kv_idx > q_idx - sliding_window``
    (``masking_utils.sliding_window_causal_mask_function``)."""
    kv_idx = np.arange(num_keys)
    causal = kv_idx <= q_idx
    return causal if sliding_window is None else causal & (kv_idx > q_idx - sliding_window)


# (block_size, group, sliding_window, logits_soft_cap): a window shorter than a page, one longer than
# a page, a window of one position (only the query's own), and one longer than most contexts.
WINDOW_CASES = [(16, 1, 7, None), (32, 4, 37, 1.5), (16, 3, 1, 0.7), (64, 2, 100, None)]


# (block_size, group): each block size once, each GQA ratio once (the cross product adds no path)
PAGED_CASES = [(16, 3), (32, 4), (64, 1)]


@pytest.mark.parametrize('block_size,group', PAGED_CASES)
def test_decode_attention_matches_dense(block_size, group):
    rng = np.random.default_rng(block_size * 10 + group)
    seqs = PagedSequences(rng, [1, block_size + 3, 0, 2 * block_size, 5], block_size)
    q = rng.standard_normal((5, KV_HEADS * group, HEAD_DIM), np.float32)
    k_pages, v_pages, tables, ctx = seqs.args()
    out = np.asarray(jax.jit(decode_attention, static_argnums=5)(
        jnp.asarray(q), k_pages, v_pages, tables, ctx, SCALE))
    for b, n in enumerate(seqs.context_lens):
        expected = dense_attention(q[b], seqs.k[b], seqs.v[b]) if n else np.zeros(q[b].shape)
        assert_close(out[b], expected)


@pytest.mark.parametrize('block_size,group', PAGED_CASES)
def test_prefill_attention_matches_dense(block_size, group):
    rng = np.random.default_rng(block_size * 10 + group + 1)
    context_lens = [block_size + 5, 7, 0, 2 * block_size + 1]
    query_lens = [9, 7, 0, block_size - 2]      # a chunk after a prefix, a whole prompt, padding
    seqs = PagedSequences(rng, context_lens, block_size)
    tokens = max(query_lens)
    q = rng.standard_normal((4, tokens, KV_HEADS * group, HEAD_DIM), np.float32)
    k_pages, v_pages, tables, ctx = seqs.args()
    out = np.asarray(jax.jit(paged_prefill_attention, static_argnums=6)(
        jnp.asarray(q), k_pages, v_pages, tables, ctx, jnp.asarray(query_lens, jnp.int32), SCALE))
    for b, (n, m) in enumerate(zip(context_lens, query_lens)):
        for i in range(tokens):
            pos = n - m + i
            expected = (dense_attention(q[b, i], seqs.k[b][:pos + 1], seqs.v[b][:pos + 1]) if i < m
                        else np.zeros(q[b, i].shape))
            assert_close(out[b, i], expected)


def whole_table_attention(q, k_pages, v_pages, tables, context_lens, query_lens=None):
    """Attention over every block of the tables, the references' ops when the longest context
    needs the whole table: prefill's (q ``[B, T, heads, d]``, ``query_lens``), or decode's (q
    ``[B, heads, d]``, ``query_lens`` None)."""
    k, v = (gather_pages(p[None], tables, jnp.int32(0)) for p in (k_pages, v_pages))
    if query_lens is None:
        mask = causal_window_mask((context_lens - 1)[:, None], k.shape[2], None)
        return masked_attention(q[:, None], k, v, mask, SCALE)[:, 0]
    tokens = jnp.arange(q.shape[1])
    q_pos = (context_lens - query_lens)[:, None] + tokens[None, :]
    mask = causal_window_mask(q_pos, k.shape[2], None) & (tokens[None, :] < query_lens[:, None])[:, :, None]
    return masked_attention(q, k, v, mask, SCALE)


def _prefill(q, k_pages, v_pages, tables, context_lens, query_lens):
    return paged_prefill_attention(q, k_pages, v_pages, tables, context_lens, query_lens, SCALE)


def _weighted_grads(f, weights, q, k_pages, v_pages, *rest):
    """The gradients of ``sum(f(...) * weights)`` with respect to q and the pages."""
    return jax.grad(lambda *a: jnp.sum(f(*a, *rest) * weights), argnums=(0, 1, 2))(q, k_pages, v_pages)


@pytest.mark.parametrize('longest', [20, 300, 700])
def test_references_attend_over_the_narrowest_table_width_that_holds_the_contexts(longest):
    """Tables of 128 blocks of 16 (widths 8, 32 and 128 blocks to choose from); the longest context
    picks each width in turn. Decode and prefill give what attending over the whole table gives,
    up to float32 rounding (the blocks past the contexts weigh exactly zero, but a reduction's
    order may follow its length), and the dense float64 result; so do their gradients with respect
    to the queries and the pages (``jax.grad`` through the choice: the research API's path)."""
    block_size, group = 16, 2
    assert context_widths(128, block_size) == (8, 32, 128)
    rng = np.random.default_rng(longest)
    context_lens = [longest, int(rng.integers(1, longest)), 0]
    query_lens = [5, 1, 0]
    seqs = PagedSequences(rng, context_lens, block_size, table_blocks=128)
    k_pages, v_pages, tables, ctx = seqs.args()
    lens = (tables, ctx, jnp.asarray(query_lens, jnp.int32))
    q = jnp.asarray(rng.standard_normal((3, 5, KV_HEADS * group, HEAD_DIM), np.float32))
    ours, expected = (np.asarray(jax.jit(f)(q, k_pages, v_pages, *lens)) for f in (_prefill, whole_table_attention))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-7)
    for b, (n, m) in enumerate(zip(context_lens, query_lens)):
        for i in range(m):
            pos = n - m + i
            assert_close(ours[b, i], dense_attention(np.asarray(q[b, i]), seqs.k[b][:pos + 1], seqs.v[b][:pos + 1]))
    decode = jax.jit(decode_attention, static_argnums=5)(q[:, 0], k_pages, v_pages, tables, ctx, SCALE)
    np.testing.assert_allclose(np.asarray(decode), np.asarray(jax.jit(whole_table_attention)(
        q[:, 0], k_pages, v_pages, tables, ctx)), rtol=1e-6, atol=1e-7)
    for b, n in enumerate(context_lens):
        assert_close(np.asarray(decode[b]), dense_attention(np.asarray(q[b, 0]), seqs.k[b], seqs.v[b]) if n
                     else np.zeros(q[b, 0].shape))
    weights = jnp.asarray(rng.standard_normal(q.shape), np.float32)
    grads = [jax.jit(_weighted_grads, static_argnums=0)(f, weights, q, k_pages, v_pages, *lens)
             for f in (_prefill, whole_table_attention)]
    for ours_grad, expected_grad in zip(*grads):
        np.testing.assert_allclose(np.asarray(ours_grad), np.asarray(expected_grad), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('block_size,layers', [(16, None), (32, None), (64, None), (16, 3)])
def test_kv_write_puts_each_token_in_its_slot(block_size, layers):
    """One layer's pools, or layer 1 of a stack of ``layers`` (the others must stay as they were)."""
    rng = np.random.default_rng(block_size)
    num_blocks, n = 6, 2 * block_size + 3
    shape = (KV_HEADS, num_blocks, block_size, HEAD_DIM) if layers is None else (layers, KV_HEADS, num_blocks,
                                                                                   block_size, HEAD_DIM)
    k_pages, v_pages = (rng.standard_normal(shape, np.float32) for _ in range(2))
    k_new, v_new = (rng.standard_normal((n, KV_HEADS, HEAD_DIM), np.float32) for _ in range(2))
    slots = rng.choice(np.arange(block_size, num_blocks * block_size), n, replace=False).astype(np.int32)
    slots[-1] = 0                                 # a padding token writes into block 0
    layer = None if layers is None else jnp.int32(1)
    k_out, v_out = jax.jit(write_kv)(*map(jnp.asarray, (k_pages, v_pages, k_new, v_new, slots)), layer)
    for pages, new, out in ((k_pages, k_new, k_out), (v_pages, v_new, v_out)):
        expected = pages.copy()
        target = expected if layers is None else expected[1]
        target[:, slots // block_size, slots % block_size] = new.transpose(1, 0, 2)
        np.testing.assert_array_equal(np.asarray(out), expected)


class DecodeStep:
    """A decode step over ``PagedSequences``: each row's token at position context_len - 1 (its
    slot still holding an old value), a random fused ``qkv``, the rope tables at those positions,
    the pools as layer 1 of a stack of 3 random layers."""

    def __init__(self, rng, context_lens, block_size, group, dtype=jnp.float32):
        self.seqs = PagedSequences(rng, context_lens, block_size)
        self.heads = KV_HEADS * group
        batch = len(context_lens)
        self.qkv = rng.standard_normal((batch, (self.heads + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32)
        pos = np.maximum(self.seqs.context_lens - 1, 0)
        self.inv_freq = 1.0 / (10000 ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
        self.cos, self.sin = cos_sin(self.inv_freq, jnp.asarray(pos))
        page = self.seqs.block_tables[np.arange(batch), pos // block_size]
        self.slots = np.where(self.seqs.context_lens > 0, page * block_size + pos % block_size, 0).astype(np.int32)
        self.pools = tuple(np.stack([rng.standard_normal(p.shape).astype(np.float32), p,
                                     rng.standard_normal(p.shape).astype(np.float32)])
                           for p in (self.seqs.k_pages, self.seqs.v_pages))
        self.dtype = dtype

    def args(self):
        """The op's arguments, scale last."""
        cast = functools.partial(jnp.asarray, dtype=self.dtype)
        return (cast(self.qkv), self.cos, self.sin, *map(cast, self.pools), jnp.int32(1),
                *map(jnp.asarray, (self.slots, self.seqs.block_tables, self.seqs.context_lens)), SCALE)


def models_decode_path(qkv, cos, sin, k_pages, v_pages, layer, slots, tables, lens, scale):
    """A decode step as separate ops, which the fused op must equal: the fused output split into
    q, k, v, rope on ``[B, T=1, heads, head_dim]``, the KV write, then decode attention."""
    batch, heads = qkv.shape[0], qkv.shape[1] // HEAD_DIM - 2 * KV_HEADS
    q, k, v = jnp.split(qkv.reshape(batch, 1, -1, HEAD_DIM), [heads, heads + KV_HEADS], axis=2)
    q, k = (apply_rope(x, cos[:, None], sin[:, None])[:, 0] for x in (q, k))
    k_pages, v_pages = write_kv_reference(k_pages, v_pages, k, v[:, 0], slots, layer)
    return paged_decode_attention_reference(q, k_pages, v_pages, layer, tables, lens, scale), k_pages, v_pages


@pytest.mark.parametrize('block_size,group,dtype', [(16, 1, jnp.float32), (32, 4, jnp.bfloat16),
                                                    (64, 8, jnp.float16), (128, 4, jnp.float32)])
def test_decode_step_reference_is_the_models_path(block_size, group, dtype):
    rng = np.random.default_rng(block_size + group)
    step = DecodeStep(rng, [1, block_size + 1, 0, 2 * block_size + 5], block_size, group, dtype)
    ours = jax.jit(decode_step_attention, static_argnums=9)(*step.args())
    theirs = jax.jit(models_decode_path, static_argnums=9)(*step.args())
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def rope_numpy(x, angles):
    """Rotate-half rope of ``x [..., head_dim]`` in float64."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles) + rotated * np.sin(angles)


@pytest.mark.parametrize('group,window,soft_cap', [(1, None, None), (4, 9, 2.0), (8, 1, None), (3, 30, 0.5)])
def test_decode_step_matches_dense(rng, group, window, soft_cap):
    """The new token's K/V land at its slot of layer 1 only, and its q attends over the cached
    positions and itself (those in its window, scores soft-capped)."""
    lens = [1, 21, 0, 50]
    step = DecodeStep(rng, lens, 16, group)
    op = functools.partial(decode_step_attention, sliding_window=window, logits_soft_cap=soft_cap)
    out, k_out, v_out = map(np.asarray, jax.jit(op, static_argnums=9)(*step.args()))
    parts = step.qkv.reshape(len(lens), -1, HEAD_DIM).astype(np.float64)
    q, k_new = parts[:, :step.heads], parts[:, step.heads:step.heads + KV_HEADS]
    v_new = parts[:, step.heads + KV_HEADS:]
    for b, n in enumerate(lens):
        angles = np.concatenate([step.inv_freq, step.inv_freq]) * max(n - 1, 0)
        k = np.concatenate([step.seqs.k[b][:n - 1], rope_numpy(k_new[b], angles)[None]]) if n else None
        v = np.concatenate([step.seqs.v[b][:n - 1], v_new[b][None]]) if n else None
        expected = (dense_attention(rope_numpy(q[b], angles), k, v, hf_mask(n, n - 1, window), soft_cap) if n
                    else np.zeros(q[b].shape))
        assert_close(out[b], expected)
        block, offset = divmod(int(step.slots[b]), 16)
        assert_close(k_out[1, :, block, offset], rope_numpy(k_new[b], angles))
        np.testing.assert_array_equal(v_out[1, :, block, offset], v_new[b].astype(np.float32))
    rest = np.ones(k_out.shape, bool)
    rest[1, :, step.slots // 16, step.slots % 16] = False
    for pages, old in ((k_out, step.pools[0]), (v_out, step.pools[1])):
        np.testing.assert_array_equal(pages[rest], old[rest])


@pytest.mark.parametrize('dtype,rtol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -6), (jnp.float16, 2 ** -9)])
@pytest.mark.parametrize('shape', [(1, 576), (3, 7, 96), (200, 128)])
def test_rms_norm_matches_float64(rng, shape, dtype, rtol):
    """Rows of scales from 0.001 to 10, so eps (1e-3) weighs on the small ones. Expected: the
    float64 normalised row rounded to ``dtype``, times the weight; 16-bit results may differ by
    the two roundings (two ulps, or subnormal ones)."""
    eps = 1e-3
    x = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1, (*shape[:-1], 1))).astype(np.float32)
    weight = (1 + 0.5 * rng.standard_normal(shape[-1])).astype(np.float32)
    x, weight = np.asarray(jnp.asarray(x, dtype), np.float64), np.asarray(jnp.asarray(weight, dtype), np.float64)
    normed = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    expected = weight * np.asarray(jnp.asarray(normed, dtype), np.float64)
    out = jax.jit(rms_norm, static_argnums=2)(jnp.asarray(x, dtype), jnp.asarray(weight, dtype), eps)
    assert out.dtype == dtype and out.shape == shape
    # products below the smallest normal number (a weight near 0) round in absolute terms
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=rtol,
                               atol=rtol * float(jnp.finfo(dtype).tiny))


def test_api_rejects_mismatched_inputs():
    pages = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 16, 32), np.float32))
    tables, lens = jnp.ones((3, 2), jnp.int32), jnp.ones((3,), jnp.int32)
    q = jnp.ones((3, 6, 32), jnp.float32)
    with pytest.raises(ValueError, match='multiple of'):
        paged_prefill_attention(jnp.ones((3, 1, 5, 32), jnp.float32), pages, pages, tables, lens, lens, 1.0)
    with pytest.raises(ValueError, match='dtype'):
        paged_prefill_attention(q[:, None].astype(jnp.bfloat16), pages, pages, tables, lens, lens, 1.0)
    with pytest.raises(ValueError, match='query_lens'):
        paged_prefill_attention(q[:, None], pages, pages, tables, lens, jnp.ones((2,), jnp.int32), 1.0)
    with pytest.raises(ValueError, match='slot_mapping must be int32'):
        write_kv(pages, pages, jnp.ones((3, 2, 32)), jnp.ones((3, 2, 32)), jnp.zeros((3,), jnp.float32))
    with pytest.raises(ValueError, match='need the layer'):
        paged_prefill_attention(q[:, None], pages[None], pages[None], tables, lens, lens, 1.0)
    with pytest.raises(ValueError, match='single-layer'):
        paged_prefill_attention(q[:, None], pages, pages, tables, lens, lens, 1.0, 2)
    with pytest.raises(ValueError, match='same shape'):
        write_kv(pages, pages[:, :2], jnp.ones((3, 2, 32)), jnp.ones((3, 2, 32)), jnp.zeros((3,), jnp.int32))
    qkv, rope_table = jnp.ones((3, 10 * 32), jnp.float32), jnp.ones((3, 32), jnp.float32)
    slots = jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match='qkv width'):
        decode_step_attention(qkv[:, :-32], rope_table, rope_table, pages, pages, None, slots, tables, lens, 1.0)
    with pytest.raises(ValueError, match='cos must be float32'):
        decode_step_attention(qkv, rope_table.astype(jnp.bfloat16), rope_table, pages, pages, None, slots, tables,
                              lens, 1.0)
    with pytest.raises(ValueError, match='slots must have shape'):
        decode_step_attention(qkv, rope_table, rope_table, pages, pages, None, slots[:2], tables, lens, 1.0)
    x = jnp.ones((2, 3, 96), jnp.bfloat16)
    with pytest.raises(ValueError, match=r'weight must have shape \(96,\)'):
        rms_norm(x, jnp.ones((95,), jnp.bfloat16), 1e-5)
    with pytest.raises(ValueError, match='need the layer to use'):
        rms_norm(x, jnp.ones((2, 96), jnp.bfloat16), 1e-5)
    with pytest.raises(ValueError, match=r'weight must be \[96\] or stacked'):
        rms_norm(x, jnp.ones((2, 95), jnp.bfloat16), 1e-5, jnp.int32(1))
    with pytest.raises(ValueError, match='given for a single weight'):
        rms_norm(x, jnp.ones((96,), jnp.bfloat16), 1e-5, jnp.int32(1))
    with pytest.raises(ValueError, match='x must be a float array'):
        rms_norm(x.astype(jnp.int32), jnp.ones((96,), jnp.bfloat16), 1e-5)


def decode_expected(q, seqs, window, soft_cap):
    """Each row's query, at position context_len - 1, over its keys: the dense oracle."""
    return [dense_attention(q[b], seqs.k[b], seqs.v[b], hf_mask(n, n - 1, window), soft_cap) if n
            else np.zeros(q[b].shape) for b, n in enumerate(seqs.context_lens)]


@pytest.mark.parametrize('block_size,group,window,soft_cap', WINDOW_CASES)
def test_windowed_soft_capped_decode_matches_dense(rng, block_size, group, window, soft_cap):
    """Contexts of one position, past a page, empty, over several pages (longer than the window),
    and one longer than the window by one."""
    seqs = PagedSequences(rng, [1, block_size + 3, 0, 3 * block_size - 1, window + 1], block_size)
    q = rng.standard_normal((5, KV_HEADS * group, HEAD_DIM)).astype(np.float32)
    op = functools.partial(decode_attention, scale=SCALE, sliding_window=window, logits_soft_cap=soft_cap)
    out = np.asarray(jax.jit(op)(jnp.asarray(q), *seqs.args()))
    for ours, expected in zip(out, decode_expected(q, seqs, window, soft_cap)):
        assert_close(ours, expected)


def prefill_expected(q, seqs, query_lens, window, soft_cap):
    """Token ``i`` of row ``b``, at position context_len - query_len + i, over the row's keys."""
    out = np.zeros(q.shape)
    for b, (n, m) in enumerate(zip(seqs.context_lens, query_lens)):
        for i in range(m):
            out[b, i] = dense_attention(q[b, i], seqs.k[b], seqs.v[b], hf_mask(n, n - m + i, window), soft_cap)
    return out


@pytest.mark.parametrize('block_size,group,window,soft_cap', WINDOW_CASES)
def test_windowed_soft_capped_prefill_matches_dense(rng, block_size, group, window, soft_cap):
    """A chunk after a cached prefix longer than the window, a whole prompt, an empty row, a long
    chunk whose first tokens' windows reach back into the prefix."""
    context_lens = [2 * block_size + 5, 9, 0, 3 * block_size + 1]
    query_lens = [9, 9, 0, 2 * block_size - 2]
    seqs = PagedSequences(rng, context_lens, block_size)
    q = rng.standard_normal((4, max(query_lens), KV_HEADS * group, HEAD_DIM)).astype(np.float32)
    op = functools.partial(paged_prefill_attention, scale=SCALE, sliding_window=window, logits_soft_cap=soft_cap)
    k_pages, v_pages, tables, ctx = seqs.args()
    out = np.asarray(jax.jit(op)(jnp.asarray(q), k_pages, v_pages, tables, ctx, jnp.asarray(query_lens, jnp.int32)))
    assert_close(out, prefill_expected(q, seqs, query_lens, window, soft_cap))


def test_traced_window_is_a_per_layer_value(rng):
    """Inside the models' scan over layers a layer's window is a traced int32 scalar, 0 for the
    global layers: one compiled function gives each layer's mask."""
    seqs = PagedSequences(rng, [40, 3, 0, 17], 16)
    q = rng.standard_normal((4, 8, KV_HEADS * 2, HEAD_DIM)).astype(np.float32)
    query_lens = [8, 3, 0, 5]
    prefill = jax.jit(lambda q, k, v, t, c, n, w: paged_prefill_attention(q, k, v, t, c, n, SCALE, sliding_window=w))
    decode = jax.jit(lambda q, k, v, t, c, w: decode_attention(q, k, v, t, c, SCALE, sliding_window=w))
    for window in (5, 0):
        w = jnp.int32(window)
        out = prefill(jnp.asarray(q), *seqs.args(), jnp.asarray(query_lens, jnp.int32), w)
        assert_close(np.asarray(out), prefill_expected(q, seqs, query_lens, window or None, None))
        out = decode(jnp.asarray(q[:, 0]), *seqs.args(), w)
        for ours, expected in zip(np.asarray(out), decode_expected(q[:, 0], seqs, window or None, None)):
            assert_close(ours, expected)


@pytest.mark.parametrize('kwargs,message', [
    (dict(sliding_window=-1), 'sliding_window must be None, 0'),
    (dict(sliding_window=True), 'sliding_window must be an int'),
    (dict(sliding_window=4.0), 'sliding_window must be an int'),
    (dict(sliding_window=jnp.ones((2,), jnp.int32)), 'sliding_window must be an int'),
    (dict(logits_soft_cap=0.0), 'logits_soft_cap must be None or a positive float'),
    (dict(logits_soft_cap='50'), 'logits_soft_cap must be None or a positive float')])
def test_attention_ops_refuse_bad_window_or_cap(kwargs, message):
    pages = jnp.ones((2, 4, 16, 32), jnp.float32)
    tables, lens = jnp.ones((3, 2), jnp.int32), jnp.ones((3,), jnp.int32)
    q = jnp.ones((3, 4, 32), jnp.float32)
    qkv, rope_table = jnp.ones((3, 8 * 32), jnp.float32), jnp.ones((3, 32), jnp.float32)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(q[:, None], pages, pages, tables, lens, lens, 1.0, **kwargs)
    with pytest.raises(ValueError, match=message):
        decode_step_attention(qkv, rope_table, rope_table, pages, pages, None, lens, tables, lens, 1.0, **kwargs)
