"""Every mesh axis name and partition rule of tensor parallelism, in one place.

Megatron-style: the fused qkv and gate_up are column-parallel (their HF ``[out, in]`` weights split
on the rows, laid out shard by shard (``models/layers/fused.py``), so each device computes whole heads /
a slice of the MLP), o/down are row-parallel (split on the columns; XLA all-reduces their partial
sums), the KV pool splits on its KV-head axis, and the
embedding/lm_head split over the vocabulary where it divides (logits come out vocab-sharded; the
sampler's reductions gather them). Norms (Qwen3's per-head q/k norms too: ``param_spec``'s default)
and the step's small inputs, the layers' sliding windows among them, are replicated.

A mixture of experts is tensor-parallel inside each expert: every device holds every expert's
slice, the stacked gate_up ``[experts, 2 * inter, hidden]`` split on its rows (shard by shard, as
the dense gate_up) and the down ``[experts, hidden, inter]`` on its columns; the router and the
shared expert's sigmoid gate are replicated, the shared expert is split as a dense MLP. With expert
parallelism (``TurbomindEngineConfig.ep == tp``, ``expert_parallel``) the stacked gate_up and down
split on the experts' axis instead: device ``d`` holds experts ``[d * E / tp, (d + 1) * E / tp)``
whole (as LMDeploy's TurboMind places them), the router and the shared expert as above.

Where ``tp`` exceeds the KV heads, each KV head is repeated ``tp // kv_heads`` times at load time
(k/v rows and the pool), so every device holds exactly one KV head and the q heads that read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from jax.sharding import PartitionSpec as P

TP = 'tp'                      # the tensor-parallel mesh axis
AXES = (TP,)                   # mesh axis names, outermost first

COLUMN_PARALLEL = ('qkv', 'gate_up', 'shared_gate_up')
ROW_PARALLEL = ('o', 'down', 'shared_down')
VOCAB_PARALLEL = ('embed', 'lm_head')

REPLICATED = P()
KV_PAGES = P(None, TP)                 # [layers, kv_heads, num_blocks, block_size, head_dim]
Q_HEADS = P(None, None, TP)            # q / attention output [B, T, heads, head_dim]
NEW_KV_HEADS = P(None, TP)             # this step's k/v [B * T, kv_heads, head_dim]
FUSED_OUTPUT = P(None, TP)             # a fused projection's output [B, F]: rows laid out shard by shard
                                       # (models/layers/fused.py), so each device's slice is its own q|k|v
ROW_INPUT = P(None, None, TP)          # a row-parallel projection's input [B, T, F]: each device its columns
ROW_WEIGHT = P(None, TP)               # a row-parallel weight [out, in], as param_spec places it
COLUMN_WEIGHT = P(TP, None)            # a column-parallel weight [out, in], as param_spec places it
PARTIAL_SUMS = P(TP)                   # per-device partial results stacked [tp, ...], not yet summed
VOCAB_ROWS = P(TP, None)               # an embedding / lm_head [vocab, hidden] split over the vocabulary
VOCAB_LOGITS = P(None, TP)             # logits [B, vocab] as the vocabulary-split lm_head computes them
EXPERT_ROWS = P(None, TP, None)        # one layer's stacked expert gate_up [experts, 2 * inter, hidden]
EXPERT_COLUMNS = P(None, None, TP)     # one layer's stacked expert down [experts, hidden, inter]
WHOLE_EXPERTS = P(TP, None, None)      # either of them under expert parallelism: E / tp whole experts a device
# A 4-bit linear's qweight [in // 8, out] and scales/zeros [groups, out] (models/layers/
# quantized_linear.py) are [in, out]-oriented: column-parallel splits their last axis, row-parallel
# their first (K split at a whole packed tile and a whole group: checked at load).
QUANTIZED_LEAVES = ('qweight', 'scales', 'zeros')
QUANTIZED_COLUMNS = P(None, TP)
QUANTIZED_ROWS = P(TP, None)
COLUMN_BIAS = P(TP)                    # a column-parallel bias [out]
COLUMN_OUTPUT = P(None, None, TP)      # a column-parallel projection's output [B, T, out], each device its columns


@dataclass(frozen=True)
class HeadSplit:
    """How ``tp`` devices share a model's heads: ``kv_replicas`` copies of each KV head are stored."""
    tp: int
    kv_heads: int          # in the checkpoint
    kv_replicas: int       # 1 unless tp > kv_heads

    @property
    def stored_kv_heads(self) -> int:
        return self.kv_heads * self.kv_replicas


def split_heads(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> HeadSplit:
    """Check that ``tp`` devices can share the heads and the MLP evenly; ValueError naming the numbers."""
    if num_heads % tp:
        raise ValueError(f'tp={tp} cannot split {num_heads} attention heads evenly')
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(f'tp={tp} cannot split {num_kv_heads} KV heads: tp must divide them or be a '
                         f'multiple of them (then each KV head is repeated tp / {num_kv_heads} times)')
    if intermediate_size % tp:
        raise ValueError(f'tp={tp} cannot split the MLP intermediate size {intermediate_size} evenly')
    return HeadSplit(tp, num_kv_heads, max(1, tp // num_kv_heads))


def splits_by_expert(ep: int, tp: int, num_experts: int) -> bool:
    """Whether ``ep`` (``TurbomindEngineConfig``'s) splits a model of ``num_experts`` experts (0: a
    dense model) whole over the ``tp`` devices (``ep == tp > 1``) rather than inside each expert
    (``ep == 1``). ValueError naming ``ep`` and what is supported otherwise: ``ep`` neither 1 nor
    ``tp``, a dense model, experts that ``ep`` does not divide."""
    if ep == 1:
        return False
    if ep != tp:
        raise ValueError(f'ep={ep} is not supported with tp={tp}: ep must be 1 (each expert split over the tp '
                         f'devices) or equal to tp (each device holding num_experts / tp whole experts)')
    if not num_experts:
        raise ValueError(f'ep={ep}: the model is not a mixture of experts; expert parallelism needs experts '
                         f'(use ep=1)')
    if num_experts % ep:
        raise ValueError(f'ep={ep} cannot split {num_experts} experts evenly over the devices (use ep=1)')
    return True


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], tp: int, expert_parallel: bool = False) -> P:
    """The partition of the model parameter at ``path`` in the ``nnx`` state (``('layers', 'attn',
    'qkv', 'w')``, ``('embed',)``, ...) of ``shape``; a linear's weight and bias are ``'w'``/``'b'``
    under its name. For the layer-stacked parameters, ``shape`` and the result are those of one layer.
    ``expert_parallel``: a mixture's experts are split whole over the devices (``ModelSpec``'s)."""
    leaf = path[-1]
    if 'experts' in path:
        if expert_parallel:
            return WHOLE_EXPERTS
        return EXPERT_ROWS if leaf == 'gate_up' else EXPERT_COLUMNS
    key = path[-2] if leaf in ('w', 'b', *QUANTIZED_LEAVES) else leaf
    if key in COLUMN_PARALLEL:
        return QUANTIZED_COLUMNS if leaf in QUANTIZED_LEAVES else COLUMN_WEIGHT if leaf == 'w' else COLUMN_BIAS
    if key in ROW_PARALLEL:
        return row_weight_spec(leaf)
    if key in VOCAB_PARALLEL and leaf != 'b' and shape[0] % tp == 0:
        return VOCAB_ROWS
    return REPLICATED


def row_weight_spec(leaf: str) -> P:
    """The partition of a row-parallel linear's parameter ``leaf`` ('w', 'b' or a 4-bit leaf) for
    one layer: split on the input axis, the bias replicated."""
    if leaf in QUANTIZED_LEAVES:
        return QUANTIZED_ROWS
    return ROW_WEIGHT if leaf == 'w' else REPLICATED
