"""XLA flags the engine relies on, added to ``XLA_FLAGS`` before JAX starts its backend (XLA reads
them once, then). A flag the user already set is left as they set it.

- ``xla_gpu_enable_dynamic_slice_fusion``: the model scans over layers and slices each weight out
  of its layer stack; with this flag cuBLAS reads the slice in place. Without it XLA copies every
  layer's weights on every step (measured on an H100: batch-1 decode at 61 tok/s instead of ~120).
- ``xla_gpu_enable_triton_gemm=false``: XLA's own Triton matmuls cannot read a slice in place
  (they get the copy); cuBLAS can, and reads the weights at ~2.8 TB/s at batch 1.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger('lmdeploy_jax')

DEFAULT_XLA_FLAGS = {'xla_gpu_enable_dynamic_slice_fusion': 'true', 'xla_gpu_enable_triton_gemm': 'false'}


def apply_default_xla_flags() -> None:
    """Add the flags above to ``XLA_FLAGS`` unless set; warn if a GPU backend already started."""
    flags = os.environ.get('XLA_FLAGS', '')
    missing = {name: value for name, value in DEFAULT_XLA_FLAGS.items() if f'--{name}=' not in flags}
    if not missing:
        return
    os.environ['XLA_FLAGS'] = ' '.join([flags, *(f'--{n}={v}' for n, v in missing.items())]).strip()
    import jax
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized() and jax.default_backend() == 'gpu':
        logger.warning('JAX started before the engine, so XLA runs without %s; set them in XLA_FLAGS before '
                       'using JAX for full decode speed on a GPU', ', '.join(f'--{n}={v}' for n, v in missing.items()))
