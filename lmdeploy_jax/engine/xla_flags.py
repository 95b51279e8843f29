"""XLA flags the engine relies on, added to ``XLA_FLAGS`` before JAX starts its backend (XLA reads
them once, then). A flag the user already set is left as they set it.

- ``xla_gpu_enable_dynamic_slice_fusion``: the model scans over layers and slices each weight out
  of its layer stack; with this flag cuBLAS reads the slice in place. Without it XLA copies every
  layer's weights on every step (measured on an H100: batch-1 decode at 61 tok/s instead of ~120).
- ``xla_gpu_enable_triton_gemm=false``: XLA's own Triton matmuls cannot read a slice in place
  (they get the copy); cuBLAS can, and reads the weights at ~2.8 TB/s at batch 1.

``executable_options`` gives one executable its own XLA options (``Lowered.compile(
compiler_options=...)``), for what must not apply process-wide: a tensor-parallel engine's
small-batch decode calls take synchronous NCCL collectives inside command buffers. Set as
process-wide ``XLA_FLAGS`` these made the whole call one CUDA graph instead of ~250 us of host
time per layer (4 x H100, llama3-8b, batch 1: tp=2 145.3 -> 161.3 tok/s, tp=4 165.8 -> 172.5, tp=1
unchanged) but cut tp=2 throughput at batch 256 from ~10,000 to 3,383 tok/s, hence per executable:
larger batches and prefill keep XLA's defaults. In the per-executable form the command-buffer and
synchronous-collective options take effect on a GPU but the one-shot kernel stays on (thunk dump,
tp=2 on 4 x H100: 35 command buffers a step between one-shot all-reduce thunks; tp=2 batch 1 ~160 tok/s,
against ~156 with the defaults). ``benchmark/executable_report.py`` shows per executable the
options in effect and the thunks. Where the engine sums small steps with its own CUDA kernel
(``models/row_parallel.py``), the rest of the step's collectives (the embedding's, the sampler's) stay
out of the command buffers (``SMALL_BATCH_P2P_OPTIONS``): the layer loop is then one command
buffer. See benchmark/NOTES.md v5-v8.
"""
from __future__ import annotations

import logging
import os

from .. import settings

logger = logging.getLogger('lmdeploy_jax')

DEFAULT_XLA_FLAGS = {'xla_gpu_enable_dynamic_slice_fusion': 'true', 'xla_gpu_enable_triton_gemm': 'false'}


def apply_default_xla_flags() -> None:
    """Add the flags above that ``XLA_FLAGS`` lacks (a flag the user set is kept as set), saying so
    in the log: the one place the library writes an environment variable, since XLA reads its flags
    from there once, when JAX starts its backend. Once JAX has started, ``XLA_FLAGS`` is left as the
    program set it (a write could no longer reach XLA), with a warning on a GPU."""
    flags = settings.current().xla_flags
    missing = ' '.join(f'--{name}={value}' for name, value in DEFAULT_XLA_FLAGS.items() if f'--{name}=' not in flags)
    if not missing:
        return
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == 'gpu':
            logger.warning('JAX started before the engine, so XLA runs without %s; set them in XLA_FLAGS before '
                           'using JAX for full decode speed on a GPU', missing)
        return
    os.environ['XLA_FLAGS'] = f'{flags} {missing}'.strip()
    logger.info('added %s to XLA_FLAGS before JAX starts its backend (lmdeploy_jax/engine/xla_flags.py)', missing)


SMALL_DECODE_ROWS = 4        # decode calls of at most this many rows take SMALL_BATCH_TP_OPTIONS
COMMAND_BUFFERS = 'FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL,COLLECTIVES'
SMALL_BATCH_TP_OPTIONS = {'xla_gpu_enable_command_buffer': COMMAND_BUFFERS,
                          'xla_gpu_unsupported_use_all_reduce_one_shot_kernel': False,
                          'xla_gpu_disable_async_collectives': 'ALLREDUCE,ALLGATHER'}
SMALL_BATCH_P2P_OPTIONS = {'xla_gpu_enable_command_buffer': COMMAND_BUFFERS.replace(',COLLECTIVES', '')}


def executable_options(kind: str, shape: tuple[int, int], tp: int, p2p_all_reduce: bool = False) -> dict:
    """XLA options for one step executable (``kind`` 'prefill' or a decode kind, ``shape`` (rows,
    tokens)) of an engine on ``tp`` devices (``p2p_all_reduce``: summing small steps with its CUDA
    kernel); empty: XLA's defaults. ``LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS``
    '0' gives every executable the defaults (to compare, or to step around an XLA that mishandles
    the options); a JSON object replaces ``SMALL_BATCH_TP_OPTIONS`` (to try other options without
    a code change). ``LMDEPLOY_JAX_DUMP_EXECUTABLES`` adds an ``xla_dump_to`` of the executable's own
    (``executable_dump_dir``), so what XLA made of each can be read (``benchmark/executable_report.py``)."""
    options = {}
    if is_small_batch_tp_decode(kind, shape, tp):
        options = small_batch_tp_options(p2p_all_reduce)
    dump = settings.current().dump_executables
    if dump:
        options['xla_dump_to'] = executable_dump_dir(dump, kind, shape)
    return options


def is_small_batch_tp_decode(kind: str, shape: tuple[int, int], tp: int) -> bool:
    return tp > 1 and kind != 'prefill' and shape[0] <= SMALL_DECODE_ROWS


def executable_dump_dir(root: str, kind: str, shape: tuple[int, int]) -> str:
    return os.path.join(root, f'{kind}-{shape[0]}x{shape[1]}')


def small_batch_tp_options(p2p_all_reduce: bool = False) -> dict:
    """``SMALL_BATCH_P2P_OPTIONS`` or ``SMALL_BATCH_TP_OPTIONS`` unless ``LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS``
    says otherwise (see above)."""
    value = settings.current().tp_small_batch_options
    if isinstance(value, dict):
        return dict(value)
    return dict(SMALL_BATCH_P2P_OPTIONS if p2p_all_reduce else SMALL_BATCH_TP_OPTIONS) if value else {}
