"""``lmdeploy_jax check_env``: what a bug report needs: versions, devices and their memory."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata

PACKAGES = ('jax', 'jaxlib', 'flax', 'orbax-checkpoint', 'transformers', 'tokenizers', 'torch',
            'numpy', 'fastapi', 'uvicorn')


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser('check_env', help='print versions, devices and memory')
    parser.set_defaults(func=main)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return 'not installed'


def _gib(num_bytes: int | None) -> str:
    return 'unknown' if num_bytes is None else f'{num_bytes / (1 << 30):.1f} GiB'


def _device_lines() -> list[str]:
    try:
        import jax
        devices = jax.devices()
    except Exception as e:  # a broken accelerator plugin is exactly what this command must report
        return [f'devices: unavailable ({type(e).__name__}: {e})']
    lines = [f'devices: {len(devices)} x {devices[0].platform}']
    for d in devices:
        stats = d.memory_stats() or {}
        limit, used = stats.get('bytes_limit'), stats.get('bytes_in_use')
        memory = f'{_gib(used)} used of {_gib(limit)}' if limit else 'memory not reported'
        lines.append(f'  {d.id}: {d.device_kind}, {memory}')
    return lines


def main(args: argparse.Namespace) -> int:
    from .. import __version__
    print(f'lmdeploy_jax: {__version__}')
    print(f'python: {sys.version.split()[0]} ({platform.platform()})')
    for package in PACKAGES:
        print(f'{package}: {_version(package)}')
    print(f'cpu cores: {os.cpu_count()}')
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') if hasattr(os, 'sysconf') else None
    print(f'host memory: {_gib(host)}')
    print('\n'.join(_device_lines()))
    return 0
