"""The XLA flags the engine adds before JAX starts its backend (``engine/xla_flags.py``): added
when missing, a user's own setting of one kept as the user set it, nothing added twice."""
from __future__ import annotations

import os

from lmdeploy_jax.engine.xla_flags import DEFAULT_XLA_FLAGS, apply_default_xla_flags


def test_missing_flags_are_added_and_the_users_are_kept(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_triton_gemm=true --xla_force_host_platform_device_count=2')
    apply_default_xla_flags()
    flags = os.environ['XLA_FLAGS'].split()
    assert '--xla_gpu_enable_triton_gemm=true' in flags and '--xla_gpu_enable_triton_gemm=false' not in flags
    assert '--xla_force_host_platform_device_count=2' in flags
    assert '--xla_gpu_enable_dynamic_slice_fusion=true' in flags
    apply_default_xla_flags()
    assert os.environ['XLA_FLAGS'].split() == flags


def test_all_defaults_when_nothing_is_set(monkeypatch):
    monkeypatch.delenv('XLA_FLAGS', raising=False)
    apply_default_xla_flags()
    assert sorted(os.environ['XLA_FLAGS'].split()) == sorted(f'--{n}={v}' for n, v in DEFAULT_XLA_FLAGS.items())
