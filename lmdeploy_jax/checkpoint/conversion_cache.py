"""Where a GGUF file's converted directory lives, and removing the conversions it replaces.

A conversion is ``<LMDEPLOY_JAX_CACHE>/gguf/<stem>-<path digest>-v<FORMAT>-<size>-<mtime ns>``: the
digest of the file's real path tells apart files of the same name in different folders, the size and
modification time tell apart versions of one file, ``FORMAT`` the conversions of this code from
those of earlier code (which read less of a file's metadata). Once a version is converted, the
directories of the file's other versions and of other formats are removed, as are those of the
earlier ``<stem>-<size>-<mtime ns>`` and ``<stem>-<path digest>-<size>-<mtime ns>`` namings (which
nothing reads any more) and any work directory older than ``ABANDONED_SECONDS`` (its conversion
died).

Safe with concurrent processes: a conversion is written in a work directory and renamed into
place, and a directory is removed by renaming it out of the way first, so no process finds half of
one under its name; the conversion of the file's version on disk now is never removed, so a process
that converted a version since replaced cannot remove the newer one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time

from .. import settings

logger = logging.getLogger('lmdeploy_jax')

WORK_PREFIX = '.converting-'
TRASH_PREFIX = '.removing-'
ABANDONED_SECONDS = 24 * 3600     # a work directory this old belongs to a conversion that died
FORMAT = 2     # raised whenever this code's conversion of a file would differ from earlier code's


def cache_folder() -> str:
    """The folder holding every GGUF conversion."""
    return os.path.join(settings.current().cache_dir, 'gguf')


def _file_id(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    return f'{stem}-{hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:12]}'


def conversion_dir(path: str) -> str:
    """The directory that holds (or will hold) the conversion of the GGUF file's current version."""
    st = os.stat(path)
    return os.path.join(cache_folder(), f'{_file_id(path)}-v{FORMAT}-{st.st_size}-{st.st_mtime_ns}')


def work_dir(path: str) -> str:
    """A new, empty directory to convert ``path`` into, beside its conversion's place."""
    os.makedirs(cache_folder(), exist_ok=True)
    return tempfile.mkdtemp(dir=cache_folder(), prefix=f'{WORK_PREFIX}{_file_id(path)}-')


def publish(work: str, out_dir: str) -> None:
    """Rename the finished ``work`` directory to ``out_dir``, or drop it when another process
    finished first."""
    try:
        os.rename(work, out_dir)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)


def remove_replaced(path: str) -> None:
    """Remove the conversions of ``path``'s other versions, and abandoned work directories (see
    the module docstring), and what removals that died left behind."""
    folder = cache_folder()
    keep = os.path.basename(conversion_dir(path))
    file_id, stem = _file_id(path), os.path.splitext(os.path.basename(path))[0]
    replaced = re.compile(rf'({re.escape(file_id)}|{re.escape(stem)})(-v\d+)?-\d+-\d+')
    for name in os.listdir(folder):
        entry = os.path.join(folder, name)
        if name != keep and replaced.fullmatch(name):
            _remove(entry)
        elif name.startswith(WORK_PREFIX) and _age(entry) > ABANDONED_SECONDS:
            _remove(entry)
        elif name.startswith(TRASH_PREFIX):      # a removal that died half-way
            shutil.rmtree(entry, ignore_errors=True)


def _age(entry: str) -> float:
    try:
        return time.time() - os.stat(entry).st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(entry: str) -> None:
    """Rename ``entry`` out of the way, then delete it; another process may have done either first."""
    trash = tempfile.mkdtemp(dir=os.path.dirname(entry), prefix=TRASH_PREFIX)
    try:
        os.rename(entry, os.path.join(trash, 'conversion'))
        logger.info('removed the replaced GGUF conversion %s', entry)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)
