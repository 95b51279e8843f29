"""A private asyncio loop on a daemon thread, so the synchronous API works inside notebooks too.

``batch_infer``, ``stream_infer`` and ``chat`` are synchronous; running their coroutines with
``asyncio.run`` would fail where a loop already runs (Jupyter). They run here instead.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Coroutine, Iterator


class BackgroundLoop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name='lmdeploy_jax-loop', daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator) -> Iterator:
        """Iterate an async iterator from synchronous code; leaving early cancels it."""
        outbox: queue.Queue = queue.Queue()
        end = object()

        async def pump():
            try:
                async for item in agen:
                    outbox.put(item)
            finally:
                outbox.put(end)

        future = asyncio.run_coroutine_threadsafe(pump(), self.loop)
        finished = False
        try:
            while (item := outbox.get()) is not end:
                yield item
            finished = True
        finally:
            if not finished:
                future.cancel()
        future.result()  # re-raise what failed inside

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


async def merge(agens: list[AsyncIterator]) -> AsyncIterator:
    """Items of several async iterators as they come; the first failure cancels the rest."""
    outbox: asyncio.Queue = asyncio.Queue()
    end = object()

    async def drain(agen):
        try:
            async for item in agen:
                await outbox.put(item)
        finally:
            await outbox.put(end)

    tasks = [asyncio.ensure_future(drain(a)) for a in agens]
    try:
        remaining = len(tasks)
        while remaining:
            item = await outbox.get()
            if item is end:
                remaining -= 1
            else:
                yield item
        for task in tasks:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
