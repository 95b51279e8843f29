"""The one small interface between the AsyncEngine and a backend.

A backend (the JAX engine, or the transformers reference) runs requests on its own thread and
reports each one's new tokens through a callback. Everything user-facing (chat templates, text,
stop strings, ``Response``) lives above this line, in the AsyncEngine; everything about devices
lives below it.

Session semantics (LMDeploy's interactive mode): a session's token history is its prompts plus
every token it generated, the final stop token included (so the next turn continues after it).
``sequence_start`` drops any earlier history of the session; ``sequence_end`` forgets the session
once the request finishes; otherwise its history (and KV) is kept for the next request.
"""
from __future__ import annotations

import abc
import collections
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .messages import FinishReason, GenerationConfig


class RequestError(ValueError):
    """A request the backend refuses (e.g. longer than the session); the engine goes on serving."""


@dataclass
class EngineRequest:
    session_id: int
    input_ids: list[int]            # tokens appended to the session: the whole prompt when sequence_start
    gen_config: GenerationConfig    # resolved: stop_token_ids hold EOS + template stop ids, max_new_tokens clipped
    sequence_start: bool = True
    sequence_end: bool = True
    arrival: float = field(default_factory=time.perf_counter, compare=False)   # made: its queue time starts


class QueueTimes:
    """Seconds each request waited from its arrival until the backend first scheduled it (its
    queue time, LMDeploy's WAITING phase), kept until the server's metrics take them. The backend
    thread adds, a scrape takes: a deque's appends and pops are thread-safe."""

    def __init__(self, keep: int = 100_000):
        self._times: collections.deque[float] = collections.deque(maxlen=keep)

    def started(self, request: EngineRequest) -> None:
        """``request`` is scheduled for the first time now."""
        self._times.append(time.perf_counter() - request.arrival)

    def take(self) -> list[float]:
        """The queue times recorded since the last call."""
        taken = []
        while self._times:
            taken.append(self._times.popleft())
        return taken


@dataclass
class EngineOutput:
    token_ids: list[int]                        # tokens generated since the previous output (never the stop token)
    logprobs: list[dict[int, float]] | None = None  # one {token_id: logprob} per new token, when asked
    finish_reason: FinishReason | None = None    # set on the request's last output only
    error: str | None = None                     # the message when finish_reason == 'error'


OutputCallback = Callable[[EngineOutput], None]


def token_ids_error(ids, vocab_size: int, name: str = 'input_ids') -> str | None:
    """Why ``ids`` is not a list of token ids in ``[0, vocab_size)`` (naming the first bad one), or None."""
    if not isinstance(ids, (list, tuple)):
        return f'{name} must be a list of token ids, got {type(ids).__name__}'
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            return f'{name}[{i}] must be a token id in [0, {vocab_size}) (the vocabulary), got {token!r}'
    return None


def gen_config_error(gen_config, vocab_size: int) -> str | None:
    """Why a request's ``GenerationConfig`` cannot run (its field and fault), or None. Checked again
    by the backends, as a config may have been changed after it was built and validated."""
    if not isinstance(gen_config, GenerationConfig):
        return f'gen_config must be a GenerationConfig, got {type(gen_config).__name__}'
    try:
        gen_config.validate(vocab_size)
    except ValueError as exc:
        return f'gen_config: {exc}'
    if gen_config.n != 1:
        return f'gen_config: n must be 1 in an engine request (the AsyncEngine runs n requests), got {gen_config.n}'
    return None


def request_refusal(request: EngineRequest, *, vocab_size: int, session_len: int, busy: bool,
                    held: int) -> str | None:
    """Why a backend must refuse ``request`` (finish it with 'error'), or None; the rules every
    backend applies. ``busy``: the session runs another request; ``held``: tokens the session
    keeps before this request (0 when it starts a new sequence)."""
    ids = request.input_ids
    if not ids:
        return 'input_ids is empty'
    error = token_ids_error(ids, vocab_size) or gen_config_error(request.gen_config, vocab_size)
    if error is not None:
        return error
    if busy:
        return f'session {request.session_id} is busy with another request'
    if held + len(ids) > session_len:
        return (f'the session would hold {held + len(ids)} tokens ({held} earlier + {len(ids)} new), '
                f'over session_len={session_len}')
    return None


class InferenceEngine(abc.ABC):
    """What the AsyncEngine needs of a backend. Callbacks run on the backend's thread: keep them short."""

    #: most tokens one session may hold (prompt + generated)
    session_len: int
    #: most requests run together
    max_batch_size: int
    #: rows of the model's embedding: every token id must be below it
    vocab_size: int

    @abc.abstractmethod
    def submit(self, request: EngineRequest, on_output: OutputCallback) -> None:
        """Queue a request. ``on_output`` receives its increments; the last has ``finish_reason`` set.

        A request that cannot run (a prompt over ``session_len``, a session already busy) finishes
        with ``finish_reason='error'`` and an ``error`` message; it never stops the engine.
        """

    @abc.abstractmethod
    def cancel(self, session_id: int) -> None:
        """Abort the session's running request (its last output says 'abort'); a no-op when idle."""

    @abc.abstractmethod
    def end_session(self, session_id: int) -> None:
        """Forget the session's history and free what it holds; cancels a running request first."""

    @abc.abstractmethod
    def get_ppl(self, input_ids: list[list[int]]) -> list[float]:
        """Mean cross-entropy of each sequence's tokens 1..n given their prefixes (LMDeploy's get_ppl).
        A sequence shorter than 2 tokens, or with an id outside the vocabulary, raises ``ValueError``
        before anything runs."""

    @abc.abstractmethod
    def token_states(self, input_ids: list[list[int]], logits: bool = True,
                     hidden: bool = True) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        """One teacher-forced forward pass over each sequence (no cache kept, no request queued):
        per sequence of n tokens, (float32 logits ``[n, vocab]``, float32 final-normed hidden states
        ``[n, hidden_size]``) at its n positions, row i the model's output after tokens 0..i; None
        in place of what is not asked for. An empty sequence, or an id outside the vocabulary,
        raises ``ValueError`` before anything runs. What ``output_logits`` and
        ``output_last_hidden_state`` return (``serve/output_states.py``)."""

    def stats(self) -> dict[str, int]:
        """Load figures for metrics: 'running', 'waiting', and where there is a paged cache
        'kv_blocks_free', 'kv_blocks_total'."""
        return {}

    def take_queue_times(self) -> list[float]:
        """The queue times (``QueueTimes``) of the requests first scheduled since the last call."""
        return []

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine thread and release devices; pending requests finish with 'abort'."""
