"""The settings module (``lmdeploy_jax/settings.py``): every variable the library reads is declared
there and nowhere else reads (or writes) the environment; values parse to their types, bad values raise a
ValueError naming the variable, and the caches follow ``LMDEPLOY_JAX_CACHE``."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmdeploy_jax import settings
from lmdeploy_jax.settings import Settings, current

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_but_the_settings_module_reads_the_environment():
    """Only ``settings.py`` reads ``os.environ``, and nothing writes it (``XLA_FLAGS`` included)."""
    found = []
    for package in ('lmdeploy_jax', 'pallas_kernels'):
        for path in sorted((ROOT / package).rglob('*.py')):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r'os\.environ|os\.getenv|environ\.get', line):
                    found.append(f'{path.relative_to(ROOT)}:{number}: {line.strip()}')
    assert [line for line in found if not line.startswith('lmdeploy_jax/settings.py:')] == []
    assert not [line for line in found if re.search(r'os\.environ\[[^]]+\] *=|putenv|setdefault', line)], found


def test_every_variable_the_sources_name_is_declared():
    declared = {f.metadata['env'] for f in dataclasses.fields(Settings)}
    named = set()
    for package in ('lmdeploy_jax', 'pallas_kernels'):
        for path in (ROOT / package).rglob('*.py'):
            named |= set(re.findall(r'\bLMDEPLOY_JAX_[A-Z_]+\b', path.read_text()))
    assert named <= declared, named - declared
    assert [name for name, _, meaning in settings.describe() if not meaning] == []


def test_defaults_when_nothing_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))
    got = current({})
    assert got == Settings(cache_dir=str(tmp_path / '.cache' / 'lmdeploy_jax'))
    assert (got.kernels, got.xla_flags) == ('auto', '')
    assert got.compilation_cache_dir == str(tmp_path / '.cache' / 'lmdeploy_jax' / 'jax_compilation_cache')


@pytest.mark.parametrize('environ, field, value', [
    ({'LMDEPLOY_JAX_CACHE': '~/elsewhere'}, 'cache_dir', os.path.expanduser('~/elsewhere')),
    ({'LMDEPLOY_JAX_KERNELS': 'pallas_interpret'}, 'kernels', 'pallas_interpret'),
    ({'HF_HUB_OFFLINE': 'yes'}, 'hf_hub_offline', True),
    ({'HF_HUB_OFFLINE': '0'}, 'hf_hub_offline', False),
    ({'LMDEPLOY_JAX_KERNELS': ''}, 'kernels', 'auto'),               # empty counts as unset
])
def test_values_parse_to_their_types(environ, field, value):
    assert getattr(current(environ), field) == value


@pytest.mark.parametrize('name, value, allowed', [
    ('LMDEPLOY_JAX_KERNELS', 'triton', 'must be one of auto, reference, pallas, pallas_interpret'),
])
def test_bad_values_name_the_variable_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ValueError) as caught:
        current({name: value})
    assert str(caught.value) == f'{name} {allowed}, got {value!r}'


def test_the_consumers_read_the_settings_when_called(monkeypatch):
    """A variable set after import takes effect at the next use (tests rely on it)."""
    from pallas_kernels._dispatch import choose_impl
    monkeypatch.setenv('LMDEPLOY_JAX_KERNELS', 'pallas_interpret')
    assert choose_impl(None, supported=True) == 'pallas_interpret'
    monkeypatch.setenv('LMDEPLOY_JAX_KERNELS', 'cuda')
    with pytest.raises(ValueError, match="LMDEPLOY_JAX_KERNELS must be one of .*, got 'cuda'"):
        choose_impl(None, supported=True)


def test_the_executable_store_keys_on_the_resolved_settings():
    import jax
    from lmdeploy_jax.engine.executable_store import environment_key
    devices = jax.devices()[:1]
    default = environment_key(devices, current({}))
    assert environment_key(devices, current({'LMDEPLOY_JAX_KERNELS': 'auto'})) == default   # the same settings
    reference = environment_key(devices, current({'LMDEPLOY_JAX_KERNELS': 'reference'}))
    assert reference != default
    assert environment_key(devices, current({'LMDEPLOY_JAX_KERNELS': 'reference',
                                             'LMDEPLOY_JAX_SLOW_TESTS': '1'})) == reference    # not a setting


def test_the_jax_compilation_cache_follows_LMDEPLOY_JAX_CACHE(tmp_path):
    """In a fresh process (JAX fixes its cache directory once per process); the executable store
    lives inside this directory (``Runner._store``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('LMDEPLOY_JAX_', 'JAX_COMPILATION'))}
    env.update(LMDEPLOY_JAX_CACHE=str(tmp_path / 'cache'), PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
    script = ('import jax\nfrom lmdeploy_jax.engine.runner import enable_compilation_cache\n'
              'enable_compilation_cache(None)\nprint(jax.config.jax_compilation_cache_dir)')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = tmp_path / 'cache' / 'jax_compilation_cache'
    assert out.stdout.strip().splitlines()[-1] == str(expected) and expected.is_dir()
