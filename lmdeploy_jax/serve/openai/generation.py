"""Running a request's generations on the AsyncEngine, counted for /metrics, aborted with their client.

A request of ``n`` choices (or several completion prompts) runs as independent generations, each
in a session of its own; their increments are merged as they come, tagged by choice index. When
the client goes away, the generators are closed, which cancels their engine requests and frees
their KV blocks (the AsyncEngine aborts a request whose caller stops listening).
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ...messages import GenerationConfig
from ..async_engine import GenOut
from ..event_loop import merge
from .errors import APIError
from .metrics import Metrics
from .sessions import anonymous_session_id


@dataclass
class Job:
    """One generation: a choice of a request."""
    index: int
    config: GenerationConfig
    input_ids: list[int]                    # tokenized before the request is answered
    session_id: int | None = None           # the engine session (sessions.py); None: a fresh anonymous one
    sequence_start: bool = True
    sequence_end: bool = True


@dataclass
class Result:
    """A generation's increments added up."""
    index: int
    text: str = ''
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    history_tokens: int = 0
    finish_reason: str | None = None

    def add(self, out: GenOut) -> None:
        self.text += out.response
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or [])
        self.prompt_tokens, self.history_tokens = out.input_token_len, out.history_token_len
        self.finish_reason = out.finish_reason


class Runner:
    def __init__(self, engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self._running: Counter[int] = Counter()     # generations in flight by engine session

    def abort_all(self) -> None:
        """Abort every generation in flight (shutdown): each finishes with 'abort', so its request
        ends as usual (a stream with its last chunk and [DONE]) and its KV is freed."""
        for session_id in list(+self._running):
            self.engine.stop_session(session_id)

    async def _run(self, job: Job) -> AsyncIterator[tuple[int, GenOut]]:
        session_id = job.session_id if job.session_id is not None else anonymous_session_id()
        self.metrics.generations.inc()
        self.metrics.running.inc()
        self._running[session_id] += 1
        timer = self.metrics.timer()
        try:
            async for out in self.engine.generate(None, session_id, job.config, sequence_start=job.sequence_start,
                                                  sequence_end=job.sequence_end, input_ids=job.input_ids):
                timer.output(len(out.token_ids), out.finish_reason is not None)
                self.metrics.generation_tokens.inc(len(out.token_ids))
                if out.finish_reason is not None:
                    self.metrics.prompt_tokens.inc(out.input_token_len)
                yield job.index, out
        finally:
            self._running[session_id] -= 1
            self.metrics.running.dec()

    def stream(self, jobs: list[Job]) -> AsyncIterator[tuple[int, GenOut]]:
        """Increments of all jobs as they come, as (choice index, GenOut)."""
        return self._run(jobs[0]) if len(jobs) == 1 else merge([self._run(job) for job in jobs])

    async def collect(self, jobs: list[Job], request: Request) -> list[Result]:
        """Every job run to its end, in index order; an engine refusal is a 400."""
        results = {job.index: Result(job.index) for job in jobs}

        async def gather():
            async for index, out in self.stream(jobs):
                results[index].add(out)
        await until_disconnected(request, gather())
        for result in results.values():
            if result.finish_reason == 'error':
                raise APIError(400, result.text.removeprefix('error: '))
        return [results[job.index] for job in jobs]


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; there is no one to answer."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())['type'] != 'http.disconnect':
        pass


async def until_disconnected(request: Request, work) -> None:
    """Await ``work``, cancelling it (and so its engine requests) if the client disconnects first."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        gone = not task.done()
        if gone:
            task.cancel()   # its generators close, cancelling their engine requests
    if gone:
        raise ClientDisconnected()
    task.result()
