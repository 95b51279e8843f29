"""Which implementation an op's ``api.py`` runs: the Pallas GPU kernel on a GPU, the XLA reference
everywhere else. Tests and benchmarks name one explicitly (the ``impl`` argument, or the
``LMDEPLOY_JAX_KERNELS`` environment variable), so a kernel can be checked in interpret mode on a
CPU and compared with the reference on the same GPU."""
from __future__ import annotations

import jax

from lmdeploy_jax.settings import KERNEL_IMPLS as IMPLS, current as current_settings


def choose_impl(impl: str | None, supported: bool) -> str:
    """Resolve ``impl`` (None: the environment variable, else ``'auto'``) to ``'reference'``,
    ``'pallas'`` or ``'pallas_interpret'``. ``'auto'`` takes the kernel only on a GPU and for
    inputs it supports; naming a kernel for inputs it does not support is an error."""
    impl = impl or current_settings().kernels
    if impl not in IMPLS:
        raise ValueError(f'unknown kernel implementation {impl!r}; expected one of {IMPLS}')
    if impl == 'auto':
        return 'pallas' if supported and jax.devices()[0].platform == 'gpu' else 'reference'
    if impl != 'reference' and not supported:
        raise ValueError(f'the Pallas kernel does not support these inputs (impl={impl!r})')
    return impl
