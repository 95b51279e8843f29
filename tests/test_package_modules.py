"""Every module of the installed packages (``lmdeploy_jax``, ``pallas_kernels``, ``convert``) is
reached by the packages' own imports from what a user runs: the console script, the public names
``lmdeploy_jax`` exports (``_EXPORTS``, imported lazily) and the model families the registry loads
by name. A module that only tests or benchmarks import belongs in ``tests/`` or ``benchmark/``.

The imports are read from the source (``ast``), relative ones resolved, every parent package of an
imported module counted as imported too."""
from __future__ import annotations

import ast
from pathlib import Path

import lmdeploy_jax
from lmdeploy_jax.models.registry import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('lmdeploy_jax', 'pallas_kernels', 'convert')


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of ``PACKAGES`` under ``root``."""
    modules = {}
    for package in PACKAGES:
        for path in (root / package).rglob('*.py'):
            name = '.'.join(path.relative_to(root).with_suffix('').parts)
            modules[name.removesuffix('.__init__')] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` (at ``path``) imports, and their parent packages."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split('.')
            found.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
    return found & set(modules)


def unreached(roots: set[str], modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that no chain of imports from ``roots`` reaches."""
    reached, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(imports_of(name, modules[name], modules) - reached)
    return set(modules) - reached


def entry_points() -> set[str]:
    """The console script, each lazily exported module, each registered family."""
    exports = {f'lmdeploy_jax{module}' for module in lmdeploy_jax._EXPORTS.values()}
    families = {f'lmdeploy_jax.models.families.{module}' for module in ARCHITECTURES.values()}
    return {'lmdeploy_jax', 'lmdeploy_jax.cli.main'} | exports | families


def test_every_package_module_is_reached_from_the_entry_points():
    assert sorted(unreached(entry_points(), package_modules())) == []


def test_a_module_only_tests_would_import_is_found(tmp_path):
    """The check itself, on a package of four modules: the one nothing else imports is reported,
    the one reached through a relative import of an imported module is not."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    files = {'__init__.py': 'from . import used\n', 'used.py': 'from .inner import helper\n',
             'inner.py': 'helper = 1\n', 'only_for_tests.py': 'import lmdeploy_jax.used\n'}
    for name, text in files.items():
        (tmp_path / 'lmdeploy_jax' / name).write_text(text)
    assert unreached({'lmdeploy_jax'}, package_modules(tmp_path)) == {'lmdeploy_jax.only_for_tests'}
