"""Every environment variable that ``lmdeploy_jax`` and ``pallas_kernels`` read, declared once: its
type, default and meaning. Nothing else in the two packages reads the environment, and nothing
writes it.

These are process-wide: where the caches live, the kernel implementation tests pick, standard
variables of other tools (``CUDA_HOME``, ``HF_HUB_OFFLINE``, ``XLA_FLAGS``, read only). What a
user chooses per engine is a ``TurbomindEngineConfig`` field; what only a benchmark varies is an
argument the benchmark passes.

``current()`` parses the environment each time it is called, so a variable a test sets before
the next use takes effect; an engine resolves it once, when built. An empty value counts as
unset. A value that does not parse raises ``ValueError`` naming the variable, the value and what
is allowed.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

KERNEL_IMPLS = ('auto', 'reference', 'pallas', 'pallas_interpret')
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def _variable(name: str, parse: Callable[[str, str], Any], default: Any, meaning: str, factory: Callable = None):
    """A settings field read from ``name`` by ``parse(name, value)``; when unset, ``default`` (or
    ``factory()``, for a default that depends on the process, such as the home directory)."""
    metadata = {'env': name, 'parse': parse, 'meaning': meaning}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser('~'), '.cache', 'lmdeploy_jax')


def _text(name: str, value: str) -> str:
    return value


def _path(name: str, value: str) -> str:
    return os.path.expanduser(value)


def _bool(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f'{name} must be one of {", ".join(_TRUE + _FALSE)}, got {value!r}')


def _hf_bool(name: str, value: str) -> bool:
    """As ``huggingface_hub`` reads its own switches: true for 1/ON/YES/TRUE, false for anything else."""
    return value.upper() in ('1', 'ON', 'YES', 'TRUE')


def _kernels(name: str, value: str) -> str:
    if value not in KERNEL_IMPLS:
        raise ValueError(f'{name} must be one of {", ".join(KERNEL_IMPLS)}, got {value!r}')
    return value


@dataclass(frozen=True)
class Settings:
    """The process's settings, one field per variable (see ``describe()`` for the table)."""
    cache_dir: str = _variable(
        'LMDEPLOY_JAX_CACHE', _path, None,
        "root of the caches: GGUF conversions, JAX's compilation cache with the executable store, CUDA kernels",
        factory=_default_cache_dir)
    kernels: str = _variable(
        'LMDEPLOY_JAX_KERNELS', _kernels, 'auto',
        "which implementation every kernel op runs: auto (Pallas on a GPU, else the XLA reference), "
        "reference, pallas or pallas_interpret")
    cuda_home: str = _variable(
        'CUDA_HOME', _path, '/usr/local/cuda', "CUDA toolkit whose nvcc builds the kernel when nvcc is not on PATH")
    hf_hub_offline: bool = _variable(
        'HF_HUB_OFFLINE', _hf_bool, False,
        "huggingface_hub's switch: resolve a model id from the local hub cache only")
    xla_flags: str = _variable(
        'XLA_FLAGS', _text, '', "XLA's own flags (read, never written): a step executable's option "
        "named here keeps the user's value (engine/xla_flags.py)")

    @property
    def compilation_cache_dir(self) -> str:
        """JAX's persistent compilation cache (the executable store lives inside it)."""
        return os.path.join(self.cache_dir, 'jax_compilation_cache')


def current(environ: dict[str, str] | None = None) -> Settings:
    """The settings ``environ`` (default: ``os.environ``) gives; ValueError naming a variable whose
    value does not parse."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in dataclasses.fields(Settings):
        raw = environ.get(f.metadata['env'], '')
        if raw != '':
            values[f.name] = f.metadata['parse'](f.metadata['env'], raw)
    return Settings(**values)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every variable, in declaration order (for docs and ``check_env``)."""
    defaults = Settings()
    return [(f.metadata['env'], repr(getattr(defaults, f.name)), f.metadata['meaning'])
            for f in dataclasses.fields(Settings)]
