"""Tensor parallelism on simulated CPU devices: greedy tokens with tp=2, 4, 8 (and 3 on the default
model) equal tp=1, a two-process ``jax.distributed`` group equals one process, and clear errors.

Every engine runs in a child process (``tensor_parallel_worker.py``): the device count
(``XLA_FLAGS=--xla_force_host_platform_device_count``) is fixed when jax starts, and this pytest
process keeps its single device for the other tests. The children compile at XLA's lowest
optimization level (quicker; tp=1 and tp=N alike) into a fresh compilation cache, so every run
compiles what it checks.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lmdeploy_jax.checkpoint.source import resolve_model
from lmdeploy_jax.engine.engine import JaxEngine
from lmdeploy_jax.messages import TurbomindEngineConfig

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'tensor_parallel_worker.py')
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
TIMEOUT = 600

TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            head_dim=8, initializer_range=0.1, max_position_embeddings=256)
CHECKPOINTS = {
    'llama-kv8': (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=8, tie_word_embeddings=False)),
    'qwen2-kv4': (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    'llama-kv2': (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    'qwen2-kv2': (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=False)),
}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict[str, str]:
    paths = {}
    for name, (config_cls, model_cls, extra) in CHECKPOINTS.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        model_cls(config_cls(**TINY, **extra)).save_pretrained(path)
        paths[name] = str(path)
    return paths


def _env(tmp_path, devices: int, **extra) -> dict[str, str]:
    """A child's environment: ``devices`` simulated CPU devices, and ``extra`` variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('LMDEPLOY_JAX_')}
    env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}',
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'), PYTHONPATH=HERE, **extra)
    return env


def _run_workers(runs: dict) -> dict:
    """``{key: (env, worker args)}`` -> ``{key: {tp: greedy tokens}}``: the workers run side by side
    (each compiles mostly on one core); every one is waited for before a failure is raised."""
    procs = {key: subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True) for key, (env, args) in runs.items()}
    outputs = {}
    try:
        outputs = {key: proc.communicate(timeout=TIMEOUT) for key, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for key, proc in procs.items():
        assert proc.returncode == 0, f'{key}: {outputs[key][1][-4000:]}'
    return {key: {int(tp): tokens for tp, tokens in json.loads(out.splitlines()[-1]).items()}
            for key, (out, _) in outputs.items()}


def _run_worker(env: dict[str, str], *args: str) -> dict[int, list[list[int]]]:
    return _run_workers({0: (env, args)})[0]


STATES = 'qwen2-kv4'         # the tied, vocabulary-split head: its token_states are compared too
MIXED = 'llama-kv2'          # its tp=2 engine runs mixed steps (enable_mixed_chunk)


@pytest.fixture(scope='module')
def tp_runs(checkpoints, tmp_path_factory) -> tuple[dict[str, dict[int, list[list[int]]]], pathlib.Path]:
    """Each checkpoint's greedy tokens at tp=1, 2, 4 and 8, and the folder holding a folder per
    checkpoint, where the ``STATES`` one's ``token_states`` are written (``tp{N}.npz``)."""
    root = tmp_path_factory.mktemp('tp_runs')
    runs = {}
    for name, path in checkpoints.items():
        (root / name).mkdir()
        states = ['--states', str(root / name)] if name == STATES else []
        mixed = ['--mixed-chunk', '2'] if name == MIXED else []
        runs[name] = (_env(root / name, 8), ('--model', path, '--tp', '1', '2', '4', '8', *states, *mixed))
    return _run_workers(runs), root


@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
def test_greedy_tokens_equal_tp1(name, tp_runs):
    """8 query heads over 8, 4 or 2 KV heads: tp=2, 4, 8 split them, repeating KV heads past their count.
    On the tied, vocabulary-split head of qwen2-kv4, ``token_states`` (``output_logits``) equal tp=1's too;
    llama-kv2's tp=2 engine runs mixed steps (the worker checks that one ran)."""
    by_name, root = tp_runs
    out = by_name[name]
    assert all(len(tokens) == 6 for tokens in out[1])
    for tp in (2, 4, 8):
        assert out[tp] == out[1], f'tp={tp}'
        if name == STATES:
            got, want = np.load(root / name / f'tp{tp}.npz'), np.load(root / name / 'tp1.npz')
            assert got['logits'].shape == (45, TINY['vocab_size']) and got['hidden'].shape == (45, TINY['hidden_size'])
            for key in ('logits', 'hidden'):
                np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=f'tp={tp} {key}')


def test_pallas_kernels_in_the_engine_give_the_reference_kernels_tokens(tmp_path):
    """Every Pallas kernel the model calls (interpret mode: the fused decode step, prefill
    attention, KV write, add + RMSNorm), inside the engine and under ``shard_map`` at tp=2, gives
    the greedy tokens of the XLA reference kernels. Head size 32: the attention kernels' smallest."""
    torch.manual_seed(0)
    path = tmp_path / 'llama-d32'
    LlamaForCausalLM(LlamaConfig(**{**TINY, 'hidden_size': 128, 'head_dim': 32, 'num_attention_heads': 4},
                                 num_key_value_heads=2)).save_pretrained(path)
    runs = {impl: (_env(tmp_path / impl, 2, LMDEPLOY_JAX_KERNELS=impl), ('--model', str(path), '--tp', '1', '2'))
            for impl in ('reference', 'pallas_interpret')}
    kernels = _run_workers(runs)
    assert all(len(tokens) == 6 for tokens in kernels['reference'][1])
    assert kernels['pallas_interpret'] == kernels['reference']
    assert kernels['reference'][2] == kernels['reference'][1]


def test_default_model_tp3_equals_tp1(tmp_path):
    """9 heads over 3 KV heads, 30 layers, tied embeddings: tp=3, one KV head a device."""
    out = _run_worker(_env(tmp_path, 8), '--tp', '1', '3', '--new-tokens', '4')
    assert out[3] == out[1]


def test_update_weights_at_tp2_gives_a_fresh_engines_tokens(tmp_path):
    """``update_weights`` at tp=2 of parameters in one device's layout (Qwen2: q/k/v biases; one KV
    head, stored once per device): the engine on A takes B's weights, then A's again. Each swap
    changes the answers, B's equal tp=1's on B and A's again equal a fresh tp=1 engine's on A."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f'qwen2-kv1-{seed}'))
        Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=1)).save_pretrained(paths[-1])
    out = _run_worker(_env(tmp_path, 2), '--model', paths[0], '--tp', '1', '2', '--swap-weights', paths[1])
    fresh_a, on_b, on_a_again = out[2]
    assert fresh_a == out[1][0] and on_b != fresh_a
    assert on_b == out[1][1] and on_a_again == out[1][0]


def test_update_weights_places_4bit_and_float_weights_as_the_loader_does(tmp_path):
    """At tp=2, one KV head (stored once per device): the parameters ``load_model`` gives without a
    mesh, placed by ``update_weights``' ``place_like``, equal bitwise (and in sharding) those it
    gives over the mesh, for a 4-bit AWQ Llama and a float Qwen2 (q/k/v biases). The mesh's own
    layout is refused, naming the fused parameter and its one-device shape."""
    from test_w4a16_engine import SHAPE as AWQ_SHAPE       # here: it imports this module (family_harness)
    from test_w4a16_engine import write_quantized
    torch.manual_seed(0)
    write_quantized(LlamaForCausalLM(LlamaConfig(**{**AWQ_SHAPE, 'num_key_value_heads': 1})),
                    str(tmp_path / 'llama-awq'), 'awq')
    Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=1)).save_pretrained(tmp_path / 'qwen2')
    code = ('import numpy as np\n'
            'from lmdeploy_jax.engine.weight_swap import place_like\n'
            'from lmdeploy_jax.models import load_model\n'
            'from lmdeploy_jax.models.loader import flat_state\n'
            'from lmdeploy_jax.parallel import make_tp_mesh\n'
            'for name in ("llama-awq", "qwen2"):\n'
            '    source = resolve_model(f"{sys.argv[1]}/{name}")\n'
            '    served = load_model(source, "float32", make_tp_mesh(2))\n'
            '    placed = flat_state(place_like(load_model(source, "float32").params, served))\n'
            '    for key, want in flat_state(served.params).items():\n'
            '        got = placed[key]\n'
            '        assert got.sharding == want.sharding and np.array_equal(got, want), (name, key)\n'
            '    try:\n'
            '        place_like(served.params, served)\n'
            '    except ValueError as exc:\n'
            '        print(name, exc)\n')
    proc = _run_engine_code(code, str(tmp_path), _env(tmp_path, 2))
    assert proc.stdout.splitlines() == [
        'llama-awq params/layers/attn/qkv/qweight: int32 (2, 32, 384), the served parameter is int32 (2, 32, 320)',
        'qwen2 params/layers/attn/qkv/b: float32 (2, 96), the served parameter is float32 (2, 80)',
    ], proc.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(checkpoints, tmp_path):
    """Two jax.distributed processes of 2 devices each run tp=4 (one mesh over both): the same
    tokens as tp=1 in one process."""
    model = ['--model', checkpoints['llama-kv2'], '--sequential']
    expected = _run_worker(_env(tmp_path, 1), *model, '--tp', '1')[1]
    coordinator = f'localhost:{_free_port()}'
    procs = [subprocess.Popen([sys.executable, WORKER, *model, '--tp', '4', '--nnodes', '2', '--node-rank', str(i),
                               '--dist-init-addr', coordinator], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(tmp_path, 2))
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert json.loads(outputs[0][0].splitlines()[-1]) == {'4': expected}
    assert not any(line.startswith('{') for line in outputs[1][0].splitlines())   # only process 0 reports


def _run_engine_code(code: str, model: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``code`` in a child process with ``env``, after the imports that build an engine;
    ``sys.argv[1]`` is ``model``."""
    imports = ('import sys\n'
               'from lmdeploy_jax.checkpoint.source import resolve_model\n'
               'from lmdeploy_jax.engine.engine import JaxEngine\n'
               'from lmdeploy_jax.messages import TurbomindEngineConfig\n')
    return subprocess.run([sys.executable, '-c', imports + code, model], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_tp_beyond_the_devices_is_a_clear_error():
    """This process has one CPU device."""
    with pytest.raises(ValueError, match=r'tp=2 needs 2 devices but only 1 cpu device'):
        JaxEngine(resolve_model(None), TurbomindEngineConfig(tp=2))


def test_heads_that_cannot_be_split_are_a_clear_error(checkpoints, tmp_path):
    """tp=3 over 8 heads; tp=8 over the default model's 9 heads (its 3 KV heads would allow neither)."""
    code = ('for model, tp in ((sys.argv[1], 3), (None, 8)):\n'
            '    try:\n'
            '        JaxEngine(resolve_model(model), TurbomindEngineConfig(tp=tp))\n'
            '    except ValueError as exc:\n'
            '        print(exc)\n')
    proc = _run_engine_code(code, checkpoints['llama-kv8'], _env(tmp_path, 8))
    assert proc.stdout.splitlines() == ['tp=3 cannot split 8 attention heads evenly',
                                        'tp=8 cannot split 9 attention heads evenly'], proc.stderr[-4000:]


@pytest.fixture(scope='module')
def step_ops(checkpoints, tmp_path_factory) -> list[tuple[str, str, str]]:
    """(step kind, op, result shape) of every scatter and all-gather in the compiled steps of a
    tp=2 engine on ``llama-kv8`` (vocabulary 1024, hidden 64; a device's vocabulary shard is 512)."""
    code = ('import re\n'
            'config = TurbomindEngineConfig(dtype="float32", tp=2, session_len=128, max_batch_size=4,\n'
            '                               num_cache_blocks=24, cache_block_seq_len=16, max_prefill_token_num=128)\n'
            'engine = JaxEngine(resolve_model(sys.argv[1]), config, decode_batch=[4], prefill_tokens=[32],\n'
            '                   prefill_batch=[4])\n'
            'op = re.compile(r"= \\w+\\[([0-9,]*)\\]\\S* (scatter|all-gather)\\(")\n'
            'for (kind, _), executable in engine._runner.executables.items():\n'
            '    for shape, name in op.findall(executable.as_text()):\n'
            '        print(kind, name, shape)\n'
            'engine.close()\n')
    proc = _run_engine_code(code, checkpoints['llama-kv8'], _env(tmp_path_factory.mktemp('step_ops'), 2))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [tuple(line.split()) for line in proc.stdout.splitlines()]


def test_sampler_scatters_over_whole_vocabulary_rows(step_ops):
    """The general sampler's scatters (penalties, masks) must not run on the lm_head's vocabulary
    shards: XLA's GPU backend ran the partitioned general sampler as a serial loop of small kernels
    (a llama3-8b prefill step at tp=2 took ~3 s on an H100), so the general steps (prefill and
    sampled decode) sample whole rows. The greedy decode step keeps the shards (its all-gather of
    [256, vocab] logits would cost more than its scatters)."""
    scatters = [(kind, shape) for kind, op, shape in step_ops if op == 'scatter']
    vocab_scatters = [(kind, shape) for kind, shape in scatters if shape.endswith(',1024')]
    assert {kind for kind, _ in vocab_scatters} == {'prefill', 'decode'}, scatters
    assert not [(kind, shape) for kind, shape in scatters if kind != 'greedy_decode' and shape.endswith(',512')], \
        scatters


def test_general_steps_gather_logits_not_the_lm_head(step_ops):
    """The general steps make whole logit rows by all-gathering the [rows, vocab] logits. Pinning
    only the replicated result let XLA's CPU partitioning all-gather the lm_head weight [vocab,
    hidden] instead, every step (on an H100, llama3-8b at tp=2, XLA gathered the logits either way)."""
    gathers = [(kind, shape) for kind, op, shape in step_ops if op == 'all-gather']
    assert ('prefill', '4,1024') in gathers and ('decode', '4,1024') in gathers, gathers
    assert not [g for g in gathers if g[1] == '1024,64'], gathers
