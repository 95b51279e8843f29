"""Compiled step executables kept on disk, found again without tracing.

JAX's persistent cache finds an executable by a hash of the lowered module, so each start would
still trace every bucket shape. This store finds a serialized executable by a key computed
before tracing, from everything the lowering depends on:

- the code that traces it: a digest of every source file of ``lmdeploy_jax`` and ``pallas_kernels``;
- the software and hardware: JAX and jaxlib versions, the backend's platform version, the devices,
  the resolved process settings (``settings.Settings``: kernel choice, ``XLA_FLAGS``, ...) and
  JAX's settings that change tracing (the ones its jit cache keys on);
- the caller's description of the function: model spec, rope frequencies, step kind, XLA options
  and the shapes, dtypes and shardings of every input.

Weights are not in the key (the params are an argument). An unreadable file is removed, a miss.
Only executables XLA compiled in this process are stored (``compile_tracked``).
"""
from __future__ import annotations

import enum
import hashlib
import logging
import os
import pickle
import threading
from pathlib import Path

import jax

from .. import settings

logger = logging.getLogger('lmdeploy_jax')

SOURCE_PACKAGES = ('lmdeploy_jax', 'pallas_kernels')
JAX_CACHE_HIT = '/jax/compilation_cache/cache_hits'
MAX_BYTES = 4 << 30      # the store's size bound: least recently used files go first

_compiling = threading.local()       # per compiling thread: did JAX's persistent cache answer?
_listener_lock = threading.Lock()
_listening = False


def _on_jax_event(event: str, **_) -> None:
    if event == JAX_CACHE_HIT:
        _compiling.from_jax_cache = True


def compile_tracked(lowered: jax.stages.Lowered, options: dict | None = None) -> tuple[jax.stages.Compiled, bool]:
    """``lowered.compile(options)``, and whether XLA compiled it here (False: JAX's persistent
    cache had it). JAX reports a cache hit as a monitoring event in the compiling thread. Options
    XLA rejects are dropped with a warning: an executable with XLA's defaults serves the same."""
    global _listening
    with _listener_lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_jax_event)
            _listening = True
    _compiling.from_jax_cache = False
    try:
        compiled = lowered.compile(compiler_options=options or None)
    except Exception as e:  # noqa: BLE001 - see the docstring
        if not options:
            raise
        logger.warning('compiling with XLA options %s failed (%s: %s); compiling with the defaults',
                       options, type(e).__name__, e)
        _compiling.from_jax_cache = False
        compiled = lowered.compile()
    return compiled, not _compiling.from_jax_cache


def _source_digest() -> str:
    """Digest of the source files of the packages that trace a step."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob('*.py')):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def environment_key(devices, env: settings.Settings) -> str:
    """What the executables on ``devices`` depend on outside the engine's own description, under
    the resolved process settings ``env`` (see the module doc); a hex digest."""
    import jaxlib
    backend = devices[0].client
    parts = [_source_digest(), jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
             repr([(d.id, d.device_kind) for d in devices]), repr(env), _trace_settings()]
    return hashlib.sha256('\n'.join(parts).encode()).hexdigest()


def _trace_settings() -> str:
    """JAX's settings that change what tracing produces: the ones its own jit cache keys on (a
    private function; x64 and the matmul precision where it is missing), plain values only (one
    entry is an object whose repr differs per process)."""
    try:
        from jax._src import config as jax_config
        values = jax_config.trace_context()
    except (ImportError, AttributeError):
        values = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision)
    return repr([v for v in values if v is None or isinstance(v, (bool, int, float, str, tuple, enum.Enum))])


def describe_inputs(tree) -> str:
    """Shapes, dtypes and shardings of a lowering's inputs, as text for a key."""
    leaves, treedef = jax.tree.flatten(tree)
    return repr((str(treedef), [(tuple(x.shape), str(x.dtype), repr(getattr(x, 'sharding', None))) for x in leaves]))


class ExecutableStore:
    """``load`` / ``save`` compiled executables under ``directory``, by a key from the
    environment (``environment_key`` of the engine's devices) plus each executable's own description."""

    def __init__(self, directory: str, devices: list, env: settings.Settings, max_bytes: int = MAX_BYTES):
        """``devices``: the engine's own, in its executables' device order; a loaded executable
        runs on these (by default JAX would load it onto every device of the host, and a tp=1 or
        tp=2 engine's calls on a 4-GPU host then fail). ``env``: the settings the engine resolved."""
        self.directory = Path(directory)
        self.devices = list(devices)
        self.environment = environment_key(self.devices, env)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, description: str) -> Path:
        key = hashlib.sha256(f'{self.environment}\n{description}'.encode()).hexdigest()
        return self.directory / f'{key}.executable'

    def load(self, description: str) -> jax.stages.Compiled | None:
        """The stored executable for ``description``, or None (not stored, or unreadable)."""
        from jax.experimental.serialize_executable import deserialize_and_load
        path = self._path(description)
        if not path.exists():
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            executable = deserialize_and_load(payload, in_tree, out_tree, execution_devices=self.devices)
            os.utime(path)          # recently used: kept longest by ``trim``
            return executable
        except Exception as e:  # noqa: BLE001 - any unreadable file is a miss
            logger.warning('removing unreadable stored executable %s (%s: %s)', path.name, type(e).__name__, e)
            path.unlink(missing_ok=True)
            return None

    def save(self, description: str, compiled: jax.stages.Compiled) -> None:
        """Store ``compiled`` (written to a temporary file, then renamed: a reader never sees half)."""
        from jax.experimental.serialize_executable import serialize
        path = self._path(description)
        try:
            blob = pickle.dumps(serialize(compiled))
        except Exception as e:  # noqa: BLE001 - an executable JAX cannot serialize is compiled each start
            logger.info('cannot store executable (%s: %s)', type(e).__name__, e)
            return
        partial = path.with_suffix(f'.{os.getpid()}.tmp')
        partial.write_bytes(blob)
        partial.replace(path)

    def trim(self) -> None:
        """Remove the least recently used files while the store holds more than ``max_bytes``
        (each code change adds a new set of executables); once after a warmup's saves."""
        files = sorted(self.directory.glob('*.executable'), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
