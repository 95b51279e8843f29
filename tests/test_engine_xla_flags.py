"""The XLA flags the engine adds before JAX starts its backend (``engine/xla_flags.py``): added
when missing, a user's own setting of one kept as the user set it, nothing added twice, nothing
written once JAX has started (in fresh processes: this one's JAX has long started); and the
per-executable options: which executables take them, and a compile that survives XLA rejecting them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmdeploy_jax.engine.xla_flags import (DEFAULT_XLA_FLAGS, SMALL_BATCH_P2P_OPTIONS, SMALL_BATCH_TP_OPTIONS,
                                           SMALL_DECODE_ROWS, executable_options)

ROOT = str(Path(__file__).resolve().parents[1])


def _apply_in_a_fresh_process(xla_flags: str | None, start_jax_first: bool = False) -> list[str]:
    """``XLA_FLAGS`` after ``apply_default_xla_flags`` (twice) in a new process, whose JAX has not
    started its backend unless ``start_jax_first``."""
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', **({'XLA_FLAGS': xla_flags} if xla_flags is not None else {}))
    script = ('import os, jax\nfrom lmdeploy_jax.engine.xla_flags import apply_default_xla_flags\n'
              f'{"jax.devices()" if start_jax_first else "pass"}\n'
              'apply_default_xla_flags()\nfirst = os.environ.get("XLA_FLAGS")\napply_default_xla_flags()\n'
              'assert os.environ.get("XLA_FLAGS") == first\nprint(repr(first))')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    value = eval(out.stdout.strip().splitlines()[-1])      # noqa: S307 - the repr of a str or None
    return value.split() if value is not None else []


def test_missing_flags_are_added_and_the_users_are_kept():
    flags = _apply_in_a_fresh_process('--xla_gpu_enable_triton_gemm=true --xla_force_host_platform_device_count=2')
    assert '--xla_gpu_enable_triton_gemm=true' in flags and '--xla_gpu_enable_triton_gemm=false' not in flags
    assert '--xla_force_host_platform_device_count=2' in flags
    assert '--xla_gpu_enable_dynamic_slice_fusion=true' in flags


def test_all_defaults_when_nothing_is_set():
    assert sorted(_apply_in_a_fresh_process(None)) == sorted(f'--{n}={v}' for n, v in DEFAULT_XLA_FLAGS.items())


def test_once_jax_has_started_the_programs_xla_flags_are_left_alone():
    assert _apply_in_a_fresh_process(None, start_jax_first=True) == []
    assert _apply_in_a_fresh_process('--xla_cpu_use_thunk_runtime=true', start_jax_first=True) == [
        '--xla_cpu_use_thunk_runtime=true']


def test_only_small_decode_calls_of_a_tensor_parallel_engine_get_their_own_options():
    small = executable_options('greedy_decode', (SMALL_DECODE_ROWS, 1), tp=2)
    assert small == SMALL_BATCH_TP_OPTIONS and small is not SMALL_BATCH_TP_OPTIONS
    assert executable_options('decode', (1, 1), tp=4) == SMALL_BATCH_TP_OPTIONS
    assert executable_options('decode', (SMALL_DECODE_ROWS * 2, 1), tp=2) == {}
    assert executable_options('prefill', (1, 32), tp=2) == {}
    assert executable_options('decode', (1, 1), tp=1) == {}


def test_an_engine_summing_with_its_cuda_kernel_leaves_xla_collectives_out_of_the_command_buffers():
    options = executable_options('greedy_decode', (1, 1), tp=2, p2p_all_reduce=True)
    assert options == SMALL_BATCH_P2P_OPTIONS
    assert 'COLLECTIVES' not in options['xla_gpu_enable_command_buffer']
    assert 'WHILE' in options['xla_gpu_enable_command_buffer']
    assert executable_options('prefill', (1, 32), tp=2, p2p_all_reduce=True) == {}


def test_each_executable_can_dump_into_a_folder_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv('LMDEPLOY_JAX_DUMP_EXECUTABLES', str(tmp_path))
    assert executable_options('prefill', (2, 64), tp=1) == {'xla_dump_to': str(tmp_path / 'prefill-2x64')}
    small = executable_options('decode', (1, 1), tp=2)
    assert small == {**SMALL_BATCH_TP_OPTIONS, 'xla_dump_to': str(tmp_path / 'decode-1x1')}


def test_small_batch_options_can_be_turned_off(monkeypatch):
    monkeypatch.setenv('LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS', '0')
    assert executable_options('greedy_decode', (1, 1), tp=2) == {}
    monkeypatch.setenv('LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS', '1')
    assert executable_options('greedy_decode', (1, 1), tp=2) == SMALL_BATCH_TP_OPTIONS


def test_small_batch_options_can_be_replaced_for_an_experiment(monkeypatch):
    monkeypatch.setenv('LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS', '{"xla_gpu_enable_command_buffer": "FUSION,CUBLAS"}')
    assert executable_options('decode', (1, 1), tp=2) == {'xla_gpu_enable_command_buffer': 'FUSION,CUBLAS'}
    assert executable_options('decode', (1, 1), tp=1) == {}
    for bad in ('yes', '["FUSION"]'):
        monkeypatch.setenv('LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS', bad)
        with pytest.raises(ValueError, match='LMDEPLOY_JAX_TP_SMALL_BATCH_OPTIONS must be 0, 1 or a JSON object'):
            executable_options('decode', (1, 1), tp=2)


def test_options_xla_rejects_fall_back_to_the_defaults():
    """A compile with options XLA does not know still yields a working executable (XLA's defaults)."""
    import jax
    import jax.numpy as jnp
    from lmdeploy_jax.engine.executable_store import compile_tracked
    lowered = jax.jit(lambda x: x * 3 + 1).lower(jnp.arange(4.0))
    compiled, _ = compile_tracked(lowered, {'xla_no_such_option': True})
    assert compiled(jnp.arange(4.0)).tolist() == [1.0, 4.0, 7.0, 10.0]
    compiled, _ = compile_tracked(lowered, SMALL_BATCH_TP_OPTIONS)      # GPU options: accepted on a CPU too
    assert compiled(jnp.arange(4.0)).tolist() == [1.0, 4.0, 7.0, 10.0]
