"""The thread-facing half that every backend shares.

Calls from any thread (submit, cancel, end_session, get_ppl, token_states, close) become commands on a queue;
the backend's own thread drains them between steps, so the engine state has one owner and needs
no locks beyond the counters here.
"""
from __future__ import annotations

import abc
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable

import numpy as np

from .engine_api import EngineOutput, EngineRequest, InferenceEngine, OutputCallback, token_ids_error

logger = logging.getLogger('lmdeploy_jax')


def emit(on_output: OutputCallback, output: EngineOutput) -> bool:
    """Call a request's callback; a failing callback is logged, never raised into the engine loop."""
    try:
        on_output(output)
        return True
    except Exception:  # noqa: BLE001
        logger.exception('an output callback raised')
        return False


class ThreadedEngine(InferenceEngine):
    """Subclasses call ``_start_thread`` at the end of ``__init__`` and implement ``_loop`` (which
    drains ``_drain_commands``) and ``_release`` (what ``close`` frees after the thread ends)."""

    def _start_thread(self, name: str) -> None:
        self._commands: queue.Queue = queue.Queue()
        self._lock = threading.Lock()          # guards _closed and _num_queued
        self._closed = False
        self._num_queued = 0                   # submitted, not yet taken by the engine thread (_count_taken)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @abc.abstractmethod
    def _loop(self) -> None:
        """The engine thread: drain commands, step, until a 'stop' command."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free the model and devices once the thread has ended."""

    def submit(self, request: EngineRequest, on_output: OutputCallback) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                self._num_queued += 1
                self._commands.put(('submit', (request, on_output)))
        if closed:
            on_output(EngineOutput([], finish_reason='abort'))

    def cancel(self, session_id: int) -> None:
        self._command('cancel', session_id)

    def end_session(self, session_id: int) -> None:
        self._command('end', session_id)

    def get_ppl(self, input_ids: list[list[int]]) -> list[float]:
        self._check_sequences('get_ppl', input_ids, 2)
        return self._call('ppl', input_ids)

    def token_states(self, input_ids: list[list[int]], logits: bool = True,
                     hidden: bool = True) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        self._check_sequences('token_states', input_ids, 1)
        return self._call('states', input_ids, logits, hidden)

    def _check_sequences(self, call: str, input_ids: list[list[int]], min_len: int) -> None:
        """ValueError naming ``call`` when a sequence is shorter than ``min_len`` or holds an id
        outside the vocabulary."""
        for i, ids in enumerate(input_ids):
            error = token_ids_error(ids, self.vocab_size, f'input_ids[{i}]')
            if error is not None:
                raise ValueError(f'{call}: {error}')
            if len(ids) < min_len:
                raise ValueError(f'{call} needs sequences of at least {min_len} token(s), got {len(ids)}')

    def _call(self, kind: str, *args):
        """Run the command ``kind`` on the engine thread, its payload ``(*args, future)``; its result."""
        result: Future = Future()
        if not self._command(kind, (*args, result)):
            raise RuntimeError(f'the {self._thread.name} is closed')
        return result.result()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._commands.put(('stop', None))
                self._closed = True
        self._thread.join()
        self._release()

    def _command(self, kind: str, payload) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._commands.put((kind, payload))
            return True

    def _drain_commands(self, block: bool) -> list[tuple[str, object]]:
        """Every queued command (waiting for one when ``block``), in order."""
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        return commands

    def _count_taken(self, place: Callable[[], None] | None = None) -> None:
        """A drained submit is out of the command queue: count it taken, with ``place()`` (which puts
        it in the engine's own queue and calls no callback) under the same lock, so that
        ``num_waiting`` never counts it in neither queue."""
        with self._lock:
            self._num_queued -= 1
            if place is not None:
                place()
