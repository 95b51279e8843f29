"""One module per kernel op benchmarked by ``bench_kernels.py``, found by name (``ops``); an op joins
the benchmark by adding its module here.

A module defines:

- ``impls(args) -> {impl: [(launch config or None, fn)]}``: every implementation named in
  ``args.impls`` that the op has (``_common.op_impls`` builds the reference and Pallas ones), each
  at its launch configs (``_common.configs``: the default, or ``SWEEP``'s grid with ``--sweep``);
- ``make_case(args, batch, context, seed) -> dict``: the inputs (jax arrays), plus ``'bytes'`` and
  ``'flops'``, what the op must move and compute;
- ``call(fn, case, table_set)``: one call of ``fn`` on the case (``table_set``: which of the
  case's rotating input sets it reads; the chained timer passes none);
- ``check_rows(fn, case)``: the output rows checked against the reference's;
- ``SWEEPS``: the launch-knob grids whose keys the table prints;
- optionally ``TIMER`` (``'calls'``, the default: calls in one jitted loop, each call's query
  depending on the last's output; ``'in_place'``: the pools carried and donated; ``'chained'``:
  each call's ``x`` is the previous call's output), ``ROWS = True`` for cases from ``--tokens``
  rather than ``--batches`` x ``--contexts``, and ``EXTRA_IMPLS``, implementations beyond
  ``reference``, ``pallas`` and ``pallas_interpret`` that take no sliding window or soft cap.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def ops() -> dict[str, ModuleType]:
    """Every op module of this package by name (modules starting with ``_`` are helpers)."""
    return {info.name: importlib.import_module(f'{__name__}.{info.name}')
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith('_')}
