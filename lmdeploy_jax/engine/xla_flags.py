"""The XLA options of each step executable, passed to its compile (``Lowered.compile(
compiler_options=...)``). The engine never writes ``XLA_FLAGS``: that variable belongs to the
user's program, and XLA reads it once, when JAX starts its backend. An option the user set in
``XLA_FLAGS`` is left as they set it.

- Every step executable takes ``GPU_STEP_OPTIONS`` (other platforms ignore them). The model scans over layers and
  slices each weight out of its layer stack: dynamic slice fusion lets cuBLAS read the slice in
  place (without it XLA copies every layer's weights on every step), and XLA's Triton matmuls,
  which cannot read a slice in place, are turned off.
- Small decode calls (at most ``SMALL_DECODE_ROWS`` rows) of a tensor-parallel engine also take
  command-buffer options (``SMALL_BATCH_TP_OPTIONS``) so that a call runs as few CUDA graphs as
  possible; larger batches and prefill keep XLA's defaults. Where the
  engine sums small steps with its own CUDA kernel (``models/row_parallel.py``), XLA's remaining
  collectives stay out of the command buffers (``SMALL_BATCH_P2P_OPTIONS``).
"""
from __future__ import annotations

GPU_STEP_OPTIONS = {'xla_gpu_enable_dynamic_slice_fusion': True, 'xla_gpu_enable_triton_gemm': False}
SMALL_DECODE_ROWS = 4        # decode calls of at most this many rows take SMALL_BATCH_TP_OPTIONS
COMMAND_BUFFERS = 'FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL,COLLECTIVES'
SMALL_BATCH_TP_OPTIONS = {'xla_gpu_enable_command_buffer': COMMAND_BUFFERS,
                          'xla_gpu_unsupported_use_all_reduce_one_shot_kernel': False,
                          'xla_gpu_disable_async_collectives': 'ALLREDUCE,ALLGATHER'}
SMALL_BATCH_P2P_OPTIONS = {'xla_gpu_enable_command_buffer': COMMAND_BUFFERS.replace(',COLLECTIVES', '')}


def executable_options(kind: str, shape: tuple[int, int], tp: int, p2p_all_reduce: bool = False,
                       user_xla_flags: str = '') -> dict:
    """XLA options for one step executable: ``kind`` 'prefill', 'mixed' or a decode kind, ``shape`` (rows,
    tokens), of an engine on ``tp`` devices; ``p2p_all_reduce``: the engine sums small steps with
    its CUDA kernel; ``user_xla_flags``: the process's ``XLA_FLAGS``, whose options are left out
    (XLA keeps the user's value). Returns a new dict."""
    options = dict(GPU_STEP_OPTIONS)
    if is_small_batch_tp_decode(kind, shape, tp):
        options.update(SMALL_BATCH_P2P_OPTIONS if p2p_all_reduce else SMALL_BATCH_TP_OPTIONS)
    return {name: value for name, value in options.items() if f'--{name}=' not in user_xla_flags}


def is_decode_kind(kind: str) -> bool:
    """Whether step executables of ``kind`` decode (one token a row a step): every kind but the
    prompt-chunk kinds, 'prefill' and 'mixed'."""
    return kind not in ('prefill', 'mixed')


def is_small_batch_tp_decode(kind: str, shape: tuple[int, int], tp: int) -> bool:
    return tp > 1 and is_decode_kind(kind) and shape[0] <= SMALL_DECODE_ROWS
