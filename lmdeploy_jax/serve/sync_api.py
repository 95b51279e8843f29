"""The synchronous API of ``AsyncEngine``: ``batch_infer`` (``infer``, ``__call__``),
``stream_infer``, ``session`` and ``chat``, each running ``generate``'s coroutines on a background
event loop (``BackgroundLoop``) so that callers without asyncio get ``Response``s.

``SyncAPI`` is a mixin: the class it is mixed into provides ``generate`` (an async iterator of
``GenOut``), ``_check_open()`` (RuntimeError once closed), ``_gen_config(gen_config, kwargs)`` and
``_one_answer_config(gen_config, kwargs, where)`` (checked settings, ValueError otherwise),
``_session_ids`` (an iterator of fresh session ids) and ``_history_len`` (session id -> tokens held),
and calls ``_close_loop()`` when it closes.
"""
from __future__ import annotations

import asyncio
from typing import Iterator

from tqdm import tqdm

from ..chat_template_kwargs import resolve_template_kwargs
from ..messages import GenerationConfig, Response
from ..text_checks import require_utf8
from .event_loop import BackgroundLoop, merge
from .prompts import check_prompts
from .samples import Sample, fan_out, group
from .session import Session


def _is_gen_configs(value) -> bool:
    return isinstance(value, GenerationConfig) or (
        isinstance(value, list) and bool(value) and all(isinstance(c, GenerationConfig) for c in value))


class SyncAPI:
    """The synchronous calls of the pipeline (see the module's docstring for what the host class provides)."""

    _sync_loop: BackgroundLoop | None = None

    @property
    def _loop(self) -> BackgroundLoop:
        """The thread that runs the synchronous API's coroutines, started on first use."""
        self._check_open()
        if self._sync_loop is None:
            self._sync_loop = BackgroundLoop()
        return self._sync_loop

    def _close_loop(self) -> None:
        """Stop the background loop, if one was started."""
        if self._sync_loop is not None:
            self._sync_loop.close()
            self._sync_loop = None

    async def _collect(self, sample: Sample, do_preprocess, tools, kwargs) -> Response:
        session_id = next(self._session_ids)
        resp = Response('', 0, 0, session_id, index=sample.index)
        async for out in self.generate(sample.prompt, session_id, sample.config, stream_response=False,
                                       do_preprocess=do_preprocess, tools=tools, **kwargs):
            resp.text += out.response
            resp.token_ids.extend(out.token_ids)
            if out.logprobs:
                resp.logprobs = (resp.logprobs or []) + out.logprobs
            resp.generate_token_len, resp.input_token_len = out.generate_token_len, out.input_token_len
            resp.finish_reason = out.finish_reason
            resp.logits, resp.last_hidden_state = out.logits, out.last_hidden_state
        return resp

    def _configs(self, gen_config, n: int, kwargs: dict) -> list[GenerationConfig]:
        """One checked config per prompt, so a bad one is refused before any prompt runs."""
        self._check_open()
        if isinstance(gen_config, list):
            if len(gen_config) != n:
                raise ValueError(f'gen_config has {len(gen_config)} entries for {n} prompts')
            return [self._gen_config(c, kwargs) for c in gen_config]
        return [self._gen_config(gen_config, kwargs)] * n

    def batch_infer(self, prompts, gen_config=None, do_preprocess: bool = True, use_tqdm: bool = False,
                    tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                    enable_thinking: bool | None = None, reasoning_effort: str | None = None,
                    **kwargs) -> Response | list[Response] | list[list[Response]]:
        """Generate for one prompt or a list of them, together; results in input order. A prompt
        whose config has ``n > 1`` gets the list of its n ``Response``s (``samples.py`` numbers
        their ``index``). ``use_tqdm`` shows a progress bar of the finished answers; ``tools``,
        ``chat_template_kwargs``, ``enable_thinking`` and ``reasoning_effort`` go to every prompt's
        chat template (``generate``)."""
        items, single = check_prompts(prompts)
        configs = self._configs(gen_config, len(items), kwargs)
        call_kwargs = {**kwargs, 'chat_template_kwargs': resolve_template_kwargs(chat_template_kwargs, enable_thinking,
                                                                                 reasoning_effort)}
        samples = fan_out(items, configs)
        if not isinstance(use_tqdm, bool):
            raise ValueError(f'use_tqdm must be True or False, got {use_tqdm!r}')

        async def run_all():
            progress = tqdm(total=len(samples)) if use_tqdm else None

            async def one(sample):
                resp = await self._collect(sample, do_preprocess, tools, call_kwargs)
                if progress is not None:
                    progress.update()
                return resp
            try:
                return await asyncio.gather(*(one(s) for s in samples))
            finally:
                if progress is not None:
                    progress.close()
        results = group(self._loop.run(run_all()), configs)
        return results[0] if single else results

    __call__ = batch_infer

    infer = batch_infer     # LMDeploy 0.12+'s name; batch_infer stays, as there

    def stream_infer(self, prompts, sessions: Session | list[Session] | None = None, gen_config=None,
                     do_preprocess: bool = True, tools: list[dict] | None = None, stream_response: bool = True,
                     chat_template_kwargs: dict | None = None, enable_thinking: bool | None = None,
                     reasoning_effort: str | None = None, **kwargs) -> Iterator[Response]:
        """Yield incremental ``Response``s (text deltas) of all prompts as they come, tagged by
        ``index``: the prompt's, or with ``n > 1`` the answer's (``samples.py``).

        ``sessions`` (LMDeploy 0.12+): a ``Session`` per prompt (one for a single prompt), whose id
        each prompt's request runs under, so ``session.abort()`` stops it; the prompt is a whole
        request, its history given in its messages, as LMDeploy's, so the engine keeps none for the
        session after it (a later ``chat`` in it starts afresh). Sessions need ``n == 1`` and
        may appear once in a call (a session runs one request at a time): ``ValueError`` otherwise,
        as for a count that differs from the prompts'. A ``GenerationConfig`` (or a list of them)
        in the second position is ``gen_config``, the signature before LMDeploy 0.12.
        ``stream_response=False`` yields one ``Response`` per answer, with its whole text, when it ends.
        ``tools``, ``chat_template_kwargs``, ``enable_thinking`` and ``reasoning_effort`` go to the
        chat template (``generate``)."""
        if gen_config is None and _is_gen_configs(sessions):
            sessions, gen_config = None, sessions
        items, _ = check_prompts(prompts)
        configs = self._configs(gen_config, len(items), kwargs)
        template_kwargs = resolve_template_kwargs(chat_template_kwargs, enable_thinking, reasoning_effort)
        samples = fan_out(items, configs)
        session_ids = self._session_ids_of(sessions, len(items), configs)
        if not isinstance(stream_response, bool):
            raise ValueError(f'stream_response must be True or False, got {stream_response!r}')

        async def one(sample: Sample):
            session_id = session_ids[sample.prompt_index] if session_ids else next(self._session_ids)
            total = Response('', 0, 0, session_id, index=sample.index)
            async for out in self.generate(sample.prompt, session_id, sample.config, stream_response=stream_response,
                                           do_preprocess=do_preprocess, tools=tools,
                                           chat_template_kwargs=template_kwargs, **kwargs):
                delta = Response(out.response, out.generate_token_len, out.input_token_len, session_id,
                                 out.finish_reason, out.token_ids, out.logprobs, sample.index, out.logits,
                                 out.last_hidden_state)
                if stream_response:
                    yield delta
                else:
                    total = total.extend(delta)
            if not stream_response:
                yield total
        yield from self._loop.iterate(merge([one(s) for s in samples]))

    def _session_ids_of(self, sessions, n_prompts: int, configs: list[GenerationConfig]) -> list[int] | None:
        """The engine session id of each prompt's request, from ``stream_infer``'s ``sessions``."""
        if sessions is None:
            return None
        sessions = [sessions] if isinstance(sessions, Session) else sessions
        if not isinstance(sessions, list) or not all(isinstance(s, Session) for s in sessions):
            raise ValueError(f'sessions must be a Session, a list of Sessions or None, got {sessions!r}')
        if len(sessions) != n_prompts:
            raise ValueError(f'sessions has {len(sessions)} entries for {n_prompts} prompts')
        ids = [s.session_id for s in sessions]
        if len(set(ids)) != len(ids):
            raise ValueError('sessions lists a session twice; a session runs one request at a time')
        if any(c.n != 1 for c in configs):
            raise ValueError('n > 1 with sessions: a session runs one request at a time; pass sessions=None')
        for session in sessions:
            session.step = 0     # each request starts and ends its session's engine history
        return ids

    def session(self) -> Session:
        """A new multi-turn session (LMDeploy's ``pipe.session()``), to pass to ``chat``."""
        self._check_open()
        return Session(next(self._session_ids), self)

    def chat(self, prompt: str, session: Session | None = None, gen_config: GenerationConfig | None = None,
             stream_response: bool = False, chat_template_kwargs: dict | None = None,
             enable_thinking: bool | None = None, reasoning_effort: str | None = None, **kwargs):
        """One turn of a multi-turn chat; the session keeps the history (and its KV) between turns.
        ``chat_template_kwargs``, ``enable_thinking`` and ``reasoning_effort`` go to this turn's chat
        template (``generate``).

        Returns the session (its ``response`` is this turn's), or with ``stream_response`` an
        iterator of incremental ``Response``s that updates the session at its end.
        """
        self._check_open()
        require_utf8(prompt, 'prompt')
        self._one_answer_config(gen_config, kwargs, 'chat()')
        template_kwargs = resolve_template_kwargs(chat_template_kwargs, enable_thinking, reasoning_effort)
        session = session or Session(next(self._session_ids), self)
        turn = self._chat_turn(prompt, session, gen_config, {**kwargs, 'chat_template_kwargs': template_kwargs})
        if stream_response:
            return turn
        for _ in turn:
            pass
        return session

    def _chat_turn(self, prompt, session: Session, gen_config, kwargs) -> Iterator[Response]:
        outs = self._loop.iterate(self.generate(prompt, session.session_id, gen_config,
                                                sequence_start=session.step == 0, sequence_end=False, **kwargs))
        total = Response('', 0, 0, session.session_id)
        for out in outs:
            total.text += out.response
            total.token_ids.extend(out.token_ids)
            total.generate_token_len, total.input_token_len = out.generate_token_len, out.input_token_len
            total.finish_reason = out.finish_reason
            total.logits, total.last_hidden_state = out.logits, out.last_hidden_state
            yield Response(out.response, out.generate_token_len, out.input_token_len, session.session_id,
                           out.finish_reason, out.token_ids, out.logprobs, logits=out.logits,
                           last_hidden_state=out.last_hidden_state)
        session.record_turn(prompt, total, self._history_len.get(session.session_id, 0))
