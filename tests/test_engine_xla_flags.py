"""The XLA options of each step executable (``engine/xla_flags.py``): which executables take which
options, the user's ``XLA_FLAGS`` winning over them, a compile that survives XLA rejecting them,
and an engine's construction leaving ``XLA_FLAGS`` as the program set it (in a fresh process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmdeploy_jax.engine.xla_flags import (GPU_STEP_OPTIONS, SMALL_BATCH_P2P_OPTIONS, SMALL_BATCH_TP_OPTIONS,
                                           SMALL_DECODE_ROWS, executable_options)

ROOT = Path(__file__).resolve().parents[1]


def test_building_an_engine_leaves_xla_flags_unchanged(tmp_path):
    """Unset before, unset after; a value the program set is kept as set; the step executables
    carry the options instead (the user's own value of one left out)."""
    script = '''
import json, os, sys
from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine.engine import JaxEngine
from lmdeploy_jax.messages import TurbomindEngineConfig
before = os.environ.get('XLA_FLAGS')
config = TurbomindEngineConfig(session_len=64, max_batch_size=2, num_cache_blocks=8, cache_block_seq_len=16,
                               max_prefill_token_num=32, compilation_cache_dir=sys.argv[1])
engine = JaxEngine(resolve_model(None), config, decode_batch=[2], prefill_tokens=[16], prefill_batch=[1])
options = {f'{kind}-{shape[0]}': engine._runner.options((kind, shape)) for kind, shape in engine._runner.executables}
engine.close()
print(json.dumps({'before': before, 'after': os.environ.get('XLA_FLAGS'), 'options': options}))
'''
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LMDEPLOY_JAX_', 'JAX_COMPILATION', 'XLA_FLAGS'))}
    env.update(PYTHONPATH=f'{ROOT}{os.pathsep}{ROOT / "tests"}', JAX_PLATFORMS='cpu')
    results = []
    for flags in (None, '--xla_gpu_enable_triton_gemm=true'):
        child_env = env if flags is None else {**env, 'XLA_FLAGS': flags}
        out = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'cache')], capture_output=True, text=True,
                             env=child_env, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    unset, user = results
    assert unset['before'] is None and unset['after'] is None
    assert user['before'] == user['after'] == '--xla_gpu_enable_triton_gemm=true'
    assert set(unset['options']) == {'decode-2', 'greedy_decode-2', 'prefill-1'}
    assert all(options == GPU_STEP_OPTIONS for options in unset['options'].values()), unset['options']
    assert all(options == {'xla_gpu_enable_dynamic_slice_fusion': True} for options in user['options'].values())


def test_every_step_takes_the_gpu_step_options():
    assert executable_options('prefill', (1, 32), tp=1) == GPU_STEP_OPTIONS
    assert executable_options('decode', (1, 1), tp=1) == GPU_STEP_OPTIONS
    options = executable_options('decode', (1, 1), tp=1)
    options['xla_gpu_enable_triton_gemm'] = True                 # a new dict each call
    assert executable_options('decode', (1, 1), tp=1) == GPU_STEP_OPTIONS


def test_the_users_xla_flags_win():
    flags = '--xla_gpu_enable_triton_gemm=true --xla_gpu_enable_command_buffer=FUSION'
    assert executable_options('prefill', (1, 32), tp=1, user_xla_flags=flags) == {
        'xla_gpu_enable_dynamic_slice_fusion': True}
    small = executable_options('decode', (1, 1), tp=2, user_xla_flags=flags)
    assert 'xla_gpu_enable_command_buffer' not in small and small['xla_gpu_disable_async_collectives']


def test_only_small_decode_calls_of_a_tensor_parallel_engine_get_the_command_buffer_options():
    assert executable_options('greedy_decode', (SMALL_DECODE_ROWS, 1), tp=2) == {**GPU_STEP_OPTIONS,
                                                                                **SMALL_BATCH_TP_OPTIONS}
    assert executable_options('decode', (1, 1), tp=4) == {**GPU_STEP_OPTIONS, **SMALL_BATCH_TP_OPTIONS}
    assert executable_options('decode', (SMALL_DECODE_ROWS * 2, 1), tp=2) == GPU_STEP_OPTIONS
    assert executable_options('prefill', (1, 32), tp=2) == GPU_STEP_OPTIONS


def test_an_engine_summing_with_its_cuda_kernel_leaves_xla_collectives_out_of_the_command_buffers():
    options = executable_options('greedy_decode', (1, 1), tp=2, p2p_all_reduce=True)
    assert options == {**GPU_STEP_OPTIONS, **SMALL_BATCH_P2P_OPTIONS}
    assert 'COLLECTIVES' not in options['xla_gpu_enable_command_buffer']
    assert 'WHILE' in options['xla_gpu_enable_command_buffer']
    assert executable_options('prefill', (1, 32), tp=2, p2p_all_reduce=True) == GPU_STEP_OPTIONS


def test_options_xla_rejects_fall_back_to_the_defaults():
    """A compile with options XLA does not know still yields a working executable (XLA's defaults)."""
    import jax
    import jax.numpy as jnp
    from lmdeploy_jax.engine.executable_store import compile_tracked
    lowered = jax.jit(lambda x: x * 3 + 1).lower(jnp.arange(4.0))
    compiled, _ = compile_tracked(lowered, {'xla_no_such_option': True})
    assert compiled(jnp.arange(4.0)).tolist() == [1.0, 4.0, 7.0, 10.0]
    compiled, _ = compile_tracked(lowered, {**GPU_STEP_OPTIONS, **SMALL_BATCH_TP_OPTIONS})   # accepted on a CPU too
    assert compiled(jnp.arange(4.0)).tolist() == [1.0, 4.0, 7.0, 10.0]
