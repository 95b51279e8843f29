"""The harness of the model-family tests (``test_model_families.py``, ``test_family_*.py``): tiny
random float32 checkpoints made by transformers' own classes, the PyTorch reference backend's
greedy tokens, transformers' last-position logits, and the JAX engine and decoder at tp=1 (XLA
reference kernels) and tp=2 (simulated CPU devices, Pallas kernels in interpret mode), each tp in a
child process of its own (``family_engine.py``), since the simulated device count is fixed when
jax starts (see ``test_tensor_parallel.py``). The children run side by side, while this process
computes the references.

A family is ``(config_cls, model_cls, extra)``: the config made from ``TINY`` updated by ``extra``,
or ``(make, extra)`` where ``make(config_fields, path, rng)`` writes the checkpoint itself and
returns the transformers model whose outputs it must reproduce (InternLM2's published layout).
"""
from __future__ import annotations

import json
import subprocess
import sys

import family_engine
import numpy as np
import pytest
import torch
from family_engine import KERNELS, NEW_TOKENS, SESSION
from test_engine_helpers import run_all
from test_models import _assert_logits_close
from test_tensor_parallel import _env

from lmdeploy_jax.checkpoint.source import ModelSource
from lmdeploy_jax.engine_api import EngineRequest
from lmdeploy_jax.messages import GenerationConfig, PytorchEngineConfig
from lmdeploy_jax.pytorch.engine import PytorchEngine

WINDOW = 8
PROMPT_LENS = (5, 14, 27, 38)          # all but the first longer than the window
PREFIX = 32                            # the fifth prompt: the last one's first 32 tokens (2 blocks), then new ones
# head_dim 32: the attention kernels' narrowest heads
TINY = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, initializer_range=0.15, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)


def reference_tokens(path: str, prompts: list[list[int]]) -> list[list[int]]:
    """The PyTorch reference backend's greedy tokens for each prompt."""
    engine = PytorchEngine(ModelSource(path, path), PytorchEngineConfig(device_type='cpu', session_len=SESSION))
    try:
        return [r.tokens for r in run_all(engine, [EngineRequest(i, p, GenerationConfig(max_new_tokens=NEW_TOKENS))
                                                   for i, p in enumerate(prompts)])]
    finally:
        engine.close()


def build_families(families: dict, tmp_path_factory, reference_path=None, tps=None,
                   expert_parallel: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per family of ``families``: the checkpoint's path, its 4 prompts and the prefix-cache prompt,
    the reference's tokens for them (from the checkpoint at ``reference_path(name, path)`` when
    given: a transformers checkpoint of the same model), transformers' last-position logits of the
    4 prompts, and those of the same weights with no window (what an engine that ignored the
    window would give). With ``tps`` (``{family: its tps}``), also ``'jax'``: ``{tp: the JAX
    engine's results}`` (``JaxChildren``), started once the checkpoints are written; for the
    families of ``expert_parallel``, also ``{(tp, tp): ...}`` at each tp > 1 with ``ep == tp``."""
    seed = int(np.random.SeedSequence().entropy % (1 << 30))
    print(f'families seed {seed}')
    rng = np.random.default_rng(seed)
    out, models = {}, {}
    for name, family in families.items():
        torch.manual_seed(int(rng.integers(1 << 30)))
        path = str(tmp_path_factory.mktemp(name))
        if len(family) == 2:
            make, extra = family
            hf = make({**TINY, **extra}, path, rng)
        else:
            config_cls, model_cls, extra = family
            hf = model_cls(config_cls(**{**TINY, **extra})).float().eval()
            hf.save_pretrained(path)
        vocab = hf.config.vocab_size
        prompts = [rng.integers(0, vocab, n).tolist() for n in PROMPT_LENS]
        cached = prompts[-1][:PREFIX] + rng.integers(0, vocab, 6).tolist()
        out[name], models[name] = dict(path=path, prompts=prompts, cached=cached), hf
    children = JaxChildren(out, tmp_path_factory.mktemp('jax'), tps, expert_parallel) if tps else None
    try:
        for name, hf in models.items():
            f = out[name]
            with torch.no_grad():
                f['logits'] = [hf(torch.tensor([p])).logits[0, -1].numpy() for p in f['prompts']]
                hf.config.sliding_window = 1 << 20          # wider than any prompt: no window
                f['unwindowed'] = [hf(torch.tensor([p])).logits[0, -1].numpy() for p in f['prompts']]
            reference = reference_path(name, f['path']) if reference_path else f['path']
            f['tokens'] = reference_tokens(reference, f['prompts'] + [f['cached']])
    except BaseException:
        if children:
            children.kill()
        raise
    results = children.wait() if children else None
    for name, f in out.items():
        if results is not None:
            f['jax'] = {tp: results[tp][name] for tp in tps[name]}
            f['jax'].update({(tp, tp): results[tp][f'{name} ep={tp}'] for tp in tps[name]
                             if tp > 1 and name in expert_parallel})
    return out


class JaxChildren:
    """The JAX engine's results for ``families`` (``{name: {'path', 'prompts', 'cached'}}``) at
    each family's tps (``tps``: ``{name: tps}``), one child process per tp, running while the
    caller goes on; a child of tp > 1 also runs the families of ``expert_parallel`` at ``ep == tp``."""

    def __init__(self, families: dict[str, dict], tmp, tps: dict[str, tuple[int, ...]],
                 expert_parallel: tuple[str, ...] = ()):
        self.outs, self.procs = {}, {}
        for tp in sorted({tp for family_tps in tps.values() for tp in family_tps}):
            spec = {name: {**{k: f[k] for k in ('path', 'prompts', 'cached')},
                           **({'ep': tp} if tp > 1 and name in expert_parallel else {})}
                    for name, f in families.items() if tp in tps[name]}
            (tmp / f'spec{tp}.json').write_text(json.dumps(spec))
            self.outs[tp] = tmp / f'out{tp}.json'
            command = [sys.executable, family_engine.__file__, str(tmp / f'spec{tp}.json'), str(tp), str(self.outs[tp])]
            self.procs[tp] = subprocess.Popen(command, env=_env(tmp / f'tp{tp}', tp), stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True)

    def wait(self) -> dict:
        """``{tp: {family: {'tokens', 'cached_tokens', 'prefix_hit_blocks', 'logits'}}}``; every
        child is waited for (killed past the timeout) before a failure is raised."""
        errors = {}
        for tp, proc in self.procs.items():
            try:
                _, errors[tp] = proc.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, errors[tp] = proc.communicate()
            print(errors[tp][-2000:])
        for tp, proc in self.procs.items():
            assert proc.returncode == 0, f'tp={tp}: {errors[tp][-4000:]}'
        return {tp: json.loads(out.read_text()) for tp, out in self.outs.items()}

    def kill(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.communicate()


def check_greedy_tokens(families: dict, jax_results: dict, name: str, tp: int | tuple[int, int]) -> None:
    """The engine's tokens equal the reference's, the fifth prompt's first two blocks came from the
    prefix cache (its window reaches into them)."""
    expected, ours = families[name]['tokens'], jax_results[name][tp]
    assert all(len(t) == NEW_TOKENS for t in expected)
    assert ours['tokens'] == expected[:-1]
    assert ours['prefix_hit_blocks'] == PREFIX // 16
    assert ours['cached_tokens'] == expected[-1]


def check_the_window_matters(family: dict) -> None:
    """Ignoring the window gives other logits for the prompts longer than it (beyond the 1e-4 the
    logits test allows) and the same for those within it, so the tests above fail on a model
    without windows."""
    for n, with_window, without in zip(PROMPT_LENS, family['logits'], family['unwindowed']):
        if n <= WINDOW:
            np.testing.assert_allclose(with_window, without, rtol=1e-5, atol=1e-5)
        else:
            assert np.abs(with_window - without).max() > 100 * 1e-4 * np.abs(with_window).max()


def family_checks(specs: dict, reference_path=None, tp1_only: dict | None = None,
                  expert_parallel: tuple[str, ...] = ()) -> tuple:
    """The fixtures and tests every family test module runs, for ``specs`` (as ``build_families``
    takes them) at each tp of ``KERNELS`` (those of ``expert_parallel`` also at each tp > 1 with
    ``ep == tp``, as the case ``(tp, tp)``), and ``tp1_only`` at tp=1 alone: ``families,
    jax_results, test_greedy_tokens_equal_the_reference,
    test_last_position_logits_match_transformers``, to be bound to those names in the module."""
    tps = {**{name: tuple(KERNELS) for name in specs}, **{name: (1,) for name in tp1_only or {}}}
    cases = [(name, tp) for name, family_tps in tps.items() for tp in family_tps]
    cases += [(name, (tp, tp)) for name in expert_parallel for tp in tps[name] if tp > 1]
    ids = [f'{name}-{tp}' if isinstance(tp, int) else f'{name}-{tp[0]}-ep{tp[1]}' for name, tp in cases]

    @pytest.fixture(scope='module')
    def families(tmp_path_factory) -> dict[str, dict]:
        return build_families({**specs, **(tp1_only or {})}, tmp_path_factory, reference_path, tps, expert_parallel)

    @pytest.fixture(scope='module')
    def jax_results(families) -> dict:
        return {name: f['jax'] for name, f in families.items()}

    @pytest.mark.parametrize('name,tp', cases, ids=ids)
    def test_greedy_tokens_equal_the_reference(families, jax_results, name, tp):
        check_greedy_tokens(families, jax_results, name, tp)

    @pytest.mark.parametrize('name,tp', cases, ids=ids)
    def test_last_position_logits_match_transformers(families, jax_results, name, tp):
        for ours, expected in zip(jax_results[name][tp]['logits'], families[name]['logits']):
            _assert_logits_close(np.asarray(ours, np.float32), expected)

    return families, jax_results, test_greedy_tokens_equal_the_reference, test_last_position_logits_match_transformers
