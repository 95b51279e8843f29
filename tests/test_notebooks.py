"""The notebooks under ``notebooks/`` run top to bottom on a clean kernel: executing one is its test
(a cell that raises, including its own asserts on what it shows, fails it), and the key cells'
printed results are checked here too. Plots draw with matplotlib's Agg backend (no display). The
notebooks are committed without outputs."""
from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
TIMEOUT_S = 300
# notebook -> text each must print (the cells' own asserts check the values)
EXPECTED = {'quickstart.ipynb': ('Paris', 'increments:', 'seed 7, twice:', 'n=2:', 'turn 2:', 'fluent',
                                 'SmolLM2-135M-Instruct.Q4_1 ->'),
            'interpretability.ipynb': ('bits', 'mean log p(next token) by depth:', 'is the top guess from layer',
                                       'most salient:', 'after one step', 'mean NLL: engine'),
            'conversion_and_sharding.ipynb': ('equal bitwise', 'cpu:2: 171.1 MiB of 513.1 MiB',
                                              'mean NLL at tp=3', 'tensors equal'),
            'benchmarking.ipynb': ('tok/s total', 'output tok/s')}


def _stream_text(nb) -> str:
    return ''.join(out.get('text', '') for cell in nb.cells if cell.cell_type == 'code'
                   for out in cell.outputs if out.output_type == 'stream')


def test_every_notebook_is_tested_and_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob('*.ipynb'))
    assert names == sorted(EXPECTED)
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == 'code'), name


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_notebook_runs_clean(name, tmp_path, monkeypatch):
    monkeypatch.setenv('MPLBACKEND', 'Agg')           # the kernel inherits it
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT_S, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}})     # the kernel's working directory
    client.execute()      # CellExecutionError on the first cell that raises
    errors = [out for cell in nb.cells if cell.cell_type == 'code' for out in cell.outputs
              if out.output_type == 'error']
    assert not errors
    printed = _stream_text(nb)
    for text in EXPECTED[name]:
        assert text in printed, f'{name} did not print {text!r}:\n{printed}'
