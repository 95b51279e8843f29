"""A built JAX engine's compiled step executables, for benchmarks: compile them again with other
XLA options or an XLA dump of their own, and serve with them.

The engine compiles each step once at start-up; nothing here is on its serving path.
"""
from __future__ import annotations

import os

from lmdeploy_jax.engine.xla_flags import SMALL_BATCH_P2P_OPTIONS, SMALL_BATCH_TP_OPTIONS, is_small_batch_tp_decode

StepKey = tuple[str, tuple[int, int]]      # (kind, (rows, tokens)), kind 'prefill', 'decode' or 'greedy_decode'
SMALL_BATCH_OPTION_NAMES = set(SMALL_BATCH_TP_OPTIONS) | set(SMALL_BATCH_P2P_OPTIONS)


def _runner(engine):
    """The engine's ``ModelRunner`` (``JaxEngine``; the pytorch backend has none)."""
    runner = getattr(engine, '_runner', None)
    if runner is None:
        raise ValueError(f'{type(engine).__name__} has no compiled steps (the turbomind backend has)')
    return runner


def dump_dir(root: str, key: StepKey) -> str:
    """The folder of ``root`` that ``recompile_steps`` has XLA dump step ``key`` into."""
    kind, (rows, tokens) = key
    return os.path.join(root, f'{kind}-{rows}x{tokens}')


def recompile_steps(engine, small_batch_tp_options: dict | None = None,
                    dump_root: str | None = None) -> dict[StepKey, tuple[object, dict]]:
    """Compile every step of ``engine`` again and serve with the new executables: with
    ``small_batch_tp_options`` (a dict of XLA options; ``{}``: XLA's defaults; None: the engine's
    own) in place of ``SMALL_BATCH_TP_OPTIONS`` / ``SMALL_BATCH_P2P_OPTIONS`` on the small
    tensor-parallel decode steps, and with ``dump_root`` an ``xla_dump_to`` folder per step
    (``dump_dir``). Call while the engine is idle. Returns each step's new executable and its
    options (the dump folder left out), by key."""
    runner = _runner(engine)
    tp = runner.model.mesh.size if runner.model.mesh is not None else 1
    steps = {}
    for key in runner.executables:
        options = runner.options(key)
        if small_batch_tp_options is not None and is_small_batch_tp_decode(*key, tp):
            options = {name: value for name, value in options.items() if name not in SMALL_BATCH_OPTION_NAMES}
            options.update(small_batch_tp_options)
        dump = {'xla_dump_to': dump_dir(dump_root, key)} if dump_root else {}
        steps[key] = (runner.recompile(key, {**options, **dump}), options)
    return steps
