"""``ruff check`` over the packages, the tests and the benchmarks, with the project's rules
(``[tool.ruff]`` in pyproject.toml), so CI fails on what it finds."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_passes():
    ruff = shutil.which('ruff', path=os.path.dirname(sys.executable)) or shutil.which('ruff')
    assert ruff is not None, "ruff is not installed (the 'test' extra installs it)"
    proc = subprocess.run([ruff, 'check', 'lmdeploy_jax', 'pallas_kernels', 'convert', 'tests', 'benchmark'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
