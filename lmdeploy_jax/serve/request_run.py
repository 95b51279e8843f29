"""One request's run: its ``EngineRequest`` submitted to the backend, the backend's token ids turned
into ``GenOut`` increments (text deltas, stop strings, the answer's logits and hidden states).

The backend reports from its own thread; its outputs reach asyncio through
``loop.call_soon_threadsafe``, so the engine loop never waits for Python callers. A caller that
stops iterating aborts the request (``backend.cancel``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import numpy as np

from ..engine_api import EngineOutput, EngineRequest, InferenceEngine
from ..messages import GenerationConfig
from ..tokenizer import DetokenizeState, Tokenizer
from .output_states import answer_states, wants_states
from .stop_strings import StopStringMatcher


@dataclass
class GenOut:
    """One increment of a request, as ``generate`` yields it (LMDeploy's GenOut)."""
    response: str                       # text delta
    history_token_len: int              # session tokens before this request
    input_token_len: int
    generate_token_len: int             # tokens generated so far in this request
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)     # token delta
    logprobs: list[dict[int, float]] | None = None          # logprob delta
    logits: np.ndarray | None = None                # the whole answer's, on the last (output_states.py)
    last_hidden_state: np.ndarray | None = None     # the whole answer's, on the last (output_states.py)


def _reported_stop_token(config: GenerationConfig, out: EngineOutput) -> int | None:
    """The stop token that ended ``out``'s request, when the engine reported it (it does so for
    ``include_stop_str_in_output``); None otherwise."""
    if out.finish_reason == 'stop' and config.include_stop_str_in_output and out.token_ids \
            and out.token_ids[-1] in (config.stop_token_ids or ()):
        return out.token_ids[-1]
    return None


async def _drain_until_finished(queue: asyncio.Queue, last: EngineOutput) -> None:
    while last.finish_reason is None:
        last = await queue.get()


async def _states(backend: InferenceEngine, ids: list[int], generated: list[int], config: GenerationConfig,
                  reason) -> tuple:
    """(logits, last hidden state) for the output that ends a request with ``reason``: the
    answer's when the request asks for them and ends with 'stop' or 'length'; else (None, None)."""
    if reason in ('stop', 'length') and wants_states(config):
        return await answer_states(backend, ids, generated, config)
    return None, None


async def run_request(backend: InferenceEngine, tokenizer: Tokenizer, request: EngineRequest, text_stops: list[str],
                      history: int, incremental: bool, on_finish: Callable[[int], None]) -> AsyncIterator[GenOut]:
    """Stream ``request``'s outputs as ``GenOut``s, the last with its finish_reason.

    ``request.gen_config`` is resolved (stop token ids and ``max_new_tokens`` final); ``text_stops``
    are the stop strings matched in the text, which end the request with 'stop' (the backend's
    request is cancelled then). ``history`` is the session's token count before the prompt. Without
    ``incremental`` the text is decoded once, at the end. ``on_finish(length)`` is called once when
    the request finishes, with the tokens its session holds after it (the history, the prompt and
    the answer, plus the stop token the backend keeps but did not report)."""
    session_id, ids, config = request.session_id, request.input_ids, request.gen_config
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
    backend.submit(request, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
    matcher, state = StopStringMatcher(text_stops, config.include_stop_str_in_output), DetokenizeState()
    generated: list[int] = []
    finished = False
    try:
        while True:
            out = await queue.get()
            generated.extend(out.token_ids)
            stop_token = _reported_stop_token(config, out)
            text_ids = generated[:-1] if stop_token is not None else generated
            text, hit_stop = '', False
            if incremental:
                delta, state = tokenizer.detokenize_incrementally(
                    text_ids, state, skip_special_tokens=config.skip_special_tokens,
                    flush=out.finish_reason is not None)
                text, hit_stop = matcher.feed(delta)
            if hit_stop:
                backend.cancel(session_id)
                await _drain_until_finished(queue, out)
                finished = True
                on_finish(history + len(ids) + len(generated))
                yield GenOut(text, history, len(ids), len(generated), 'stop', out.token_ids, out.logprobs,
                             *await _states(backend, ids, generated, config, 'stop'))
                return
            reason = out.finish_reason
            if reason is not None:
                finished = True
                text += (matcher.flush() if incremental else
                         tokenizer.decode(text_ids, skip_special_tokens=config.skip_special_tokens))
                if stop_token is not None:   # LMDeploy's: the stop token's text, special or not
                    text += tokenizer.decode([stop_token], skip_special_tokens=False)
                if reason == 'error':
                    text = f'error: {out.error}'
                on_finish(history + len(ids) + len(generated) + (reason == 'stop' and stop_token is None))
            yield GenOut(text, history, len(ids), len(generated), reason, out.token_ids, out.logprobs,
                         *await _states(backend, ids, generated, config, reason))
            if finished:
                return
    finally:
        if not finished:  # the caller stopped listening: abort and free the request
            backend.cancel(session_id)
