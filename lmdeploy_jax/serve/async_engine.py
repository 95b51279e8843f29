"""LMDeploy's AsyncEngine: prompts in, text out, over any backend of ``engine_api``.

It owns everything user-facing: chat templates, tokenization, stop strings, incremental
detokenization and ``Response``s. Backends report token ids from their own thread; results reach
asyncio through ``loop.call_soon_threadsafe``, so the engine loop never waits for Python callers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import numpy as np
from tqdm import tqdm

from ..backends import BACKENDS, check_supported, create_backend
from ..chat_template import get_chat_template
from ..chat_template_kwargs import resolve_template_kwargs
from ..checkpoint.source import resolve_model
from ..engine_api import EngineOutput, EngineRequest, token_ids_error
from ..messages import GenerationConfig, PytorchEngineConfig, Response, TurbomindEngineConfig
from ..models.registry import is_supported
from ..text_checks import require_utf8
from ..tokenizer import DetokenizeState, Tokenizer
from .event_loop import BackgroundLoop, merge
from .output_states import answer_states, check_context, wants_states
from .request_config import merge_gen_config, resolve_stops
from .samples import Sample, fan_out, group
from .session import Session
from .stop_strings import StopStringMatcher
from .unsupported import refuse_unknown_keywords

logger = logging.getLogger('lmdeploy_jax')


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


def _check_prompts(prompts) -> tuple[list, bool]:
    """Normalize to a list of prompts; reject what cannot be a prompt (or text that is not UTF-8), naming it."""
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    items = [prompts] if single else prompts
    if not isinstance(items, list) or not items:
        raise ValueError('prompts must be a non-empty str, a list of str or a list of message lists; got '
                         f'{prompts!r}')
    for i, p in enumerate(items):
        if isinstance(p, str) and not p.strip():
            raise ValueError(f'prompt {i} is empty')
        if isinstance(p, list) and not p:
            raise ValueError(f'prompt {i} is an empty message list')
        if not isinstance(p, (str, list)):
            raise ValueError(f'prompt {i} must be a str or a message list, got {type(p).__name__}')
        require_utf8(p, f'prompts[{i}]')
    return items, single


def _reported_stop_token(config: GenerationConfig, out: EngineOutput) -> int | None:
    """The stop token that ended ``out``'s request, when the engine reported it (it does so for
    ``include_stop_str_in_output``); None otherwise."""
    if out.finish_reason == 'stop' and config.include_stop_str_in_output and out.token_ids \
            and out.token_ids[-1] in (config.stop_token_ids or ()):
        return out.token_ids[-1]
    return None


def _is_gen_configs(value) -> bool:
    return isinstance(value, GenerationConfig) or (
        isinstance(value, list) and bool(value) and all(isinstance(c, GenerationConfig) for c in value))


def _timed(what: str, fn, *args):
    """``fn(*args)``, logging how long it took (start-up phases)."""
    start = time.perf_counter()
    result = fn(*args)
    logger.info('%s ready in %.1f s', what, time.perf_counter() - start)
    return result


class AsyncEngine:
    """The object ``pipeline()`` returns.

    Bad input raises ``ValueError`` naming the field before anything is queued: prompts and
    messages (text must encode as UTF-8), generation settings (``GenerationConfig.validate``
    against the model's vocabulary), token ids. After ``close()`` every call raises
    ``RuntimeError('the pipeline is closed')``; ``close()`` itself may be repeated.
    """

    def __init__(self, model_path: str | None, model_name: str | None = None, backend: str = 'turbomind',
                 backend_config: TurbomindEngineConfig | PytorchEngineConfig | None = None,
                 chat_template_config=None, trust_remote_code: bool = False, **kwargs):
        refuse_unknown_keywords('AsyncEngine', kwargs)
        if not isinstance(trust_remote_code, bool):
            raise ValueError(f'trust_remote_code must be True or False, got {trust_remote_code!r}')
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
        if dataclasses.is_dataclass(chat_template_config):
            require_utf8(dataclasses.asdict(chat_template_config), 'chat_template_config')
        self._closed = False
        self.source = resolve_model(model_path)
        check_supported(self.source)
        self.model_name = model_name or self.source.given
        self.backend = backend
        # The tokenizer loads while the JAX engine starts (importing transformers alone takes seconds);
        # not beside the reference backend, whose import of transformers would race this one.
        overlap = backend == 'turbomind' and is_supported(self.source.architecture)
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='tokenizer') as pool:
            tokenizer = pool.submit(_timed, 'tokenizer', Tokenizer, self.source.hf_dir, trust_remote_code)
            if not overlap:
                tokenizer.result()
            self.engine = _timed('engine', create_backend, self.source, backend, backend_config)
            try:
                self.tokenizer = tokenizer.result()
                self.chat_template = get_chat_template(chat_template_config, self.source.given, self.tokenizer)
            except BaseException:
                self.engine.close()
                raise
        self.session_len = self.engine.session_len
        self.vocab_size = self.engine.vocab_size
        self._eos_ids = sorted(set(self.source.generation_eos_ids())
                               | ({self.tokenizer.eos_token_id} - {None}))
        self._session_ids = itertools.count(1)
        self._history_len: dict[int, int] = {}     # tokens held by each open session
        self._sync_loop: BackgroundLoop | None = None

    # ---- the async core ------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError('the pipeline is closed')

    def _gen_config(self, gen_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
        """The request's settings (legacy keyword arguments applied), checked against the vocabulary."""
        config = merge_gen_config(gen_config, **kwargs)
        config.validate(self.vocab_size)
        return config

    def _one_answer_config(self, gen_config: GenerationConfig | None, kwargs: dict, where: str) -> GenerationConfig:
        """``_gen_config`` for the calls that give one answer: ``n > 1`` is refused there."""
        config = self._gen_config(gen_config, kwargs)
        if config.n != 1:
            raise ValueError(f'n={config.n}: {where} gives one answer; batch_infer and stream_infer give n')
        return config

    def _prompt_ids(self, messages, sequence_start: bool, do_preprocess: bool, input_ids, tools,
                    template_kwargs: dict) -> list[int]:
        if input_ids is not None:
            if template_kwargs:
                raise ValueError('chat_template_kwargs, enable_thinking and reasoning_effort need messages, not '
                                 'input_ids: the chat template renders messages')
            error = token_ids_error(input_ids, self.vocab_size)
            if error is not None:
                raise ValueError(error)
            return list(input_ids)
        require_utf8(messages, 'messages')
        if do_preprocess:
            prompt = self.chat_template.messages2prompt(messages, sequence_start, tools=tools, **template_kwargs)
        elif tools or template_kwargs:
            given = 'tools' if tools else 'chat_template_kwargs, enable_thinking and reasoning_effort'
            raise ValueError(f'{given} need do_preprocess=True: the chat template renders them')
        elif isinstance(messages, str):
            prompt = messages
        else:
            raise ValueError('do_preprocess=False needs a str prompt')
        return self.tokenizer.encode(prompt, add_bos=sequence_start)

    async def generate(self, messages, session_id: int, gen_config: GenerationConfig | None = None,
                       stream_response: bool = True, sequence_start: bool = True, sequence_end: bool = True,
                       step: int = 0, do_preprocess: bool = True, input_ids: list[int] | None = None,
                       tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                       enable_thinking: bool | None = None, reasoning_effort: str | None = None,
                       **kwargs) -> AsyncIterator[GenOut]:
        """Run one request of a session; yields text and token deltas, the last with finish_reason.
        ``tools`` (OpenAI's tool dicts) are rendered by the chat template (a template that cannot
        render them raises ``ValueError``); the answer is the model's text, tool calls unparsed,
        as LMDeploy's pipeline returns it. ``chat_template_kwargs`` are variables of the model's
        Jinja template, LMDeploy's ``enable_thinking`` and ``reasoning_effort`` two of them
        (``chat_template_kwargs.py``; a key the template does not read raises
        ``TemplateArgumentError``, a ``ValueError``). Bad input raises ``ValueError`` (naming the
        field) at the first iteration, before anything is queued; a closed pipeline raises
        ``RuntimeError``."""
        self._check_open()
        config = self._one_answer_config(gen_config, kwargs, 'generate()')
        template_kwargs = resolve_template_kwargs(chat_template_kwargs, enable_thinking, reasoning_effort)
        history = step or (0 if sequence_start else self._history_len.get(session_id, 0))
        check_context(config, history)
        ids = self._prompt_ids(messages, sequence_start, do_preprocess, input_ids, tools, template_kwargs)
        if not ids:
            raise ValueError('the prompt encodes to no tokens')
        room = self.session_len - history - len(ids)
        if room < 0:
            yield GenOut(f'error: the prompt has {len(ids)} tokens, which with {history} tokens of history '
                         f'exceeds session_len={self.session_len}', history, len(ids), 0, 'error')
            return
        config, text_stops = resolve_stops(config.replace(max_new_tokens=min(config.max_new_tokens, room)),
                                           self.chat_template.stop_words, self.tokenizer, self._eos_ids)
        async for out in self._run(session_id, ids, config, text_stops, history, sequence_start, sequence_end,
                                   incremental=stream_response or bool(text_stops)):
            yield out

    async def _run(self, session_id, ids, config, text_stops, history, sequence_start, sequence_end, incremental):
        """Stream the engine's outputs; without ``incremental`` the text is decoded once, at the end."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.engine.submit(EngineRequest(session_id, ids, config, sequence_start, sequence_end),
                           lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
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
                    delta, state = self.tokenizer.detokenize_incrementally(
                        text_ids, state, skip_special_tokens=config.skip_special_tokens,
                        flush=out.finish_reason is not None)
                    text, hit_stop = matcher.feed(delta)
                if hit_stop:
                    self.engine.cancel(session_id)
                    await self._drain_until_finished(queue, out)
                    finished = True
                    self._record_history(session_id, sequence_end, history + len(ids) + len(generated))
                    yield GenOut(text, history, len(ids), len(generated), 'stop', out.token_ids, out.logprobs,
                                 *await self._states(ids, generated, config, 'stop'))
                    return
                reason = out.finish_reason
                if reason is not None:
                    finished = True
                    text += (matcher.flush() if incremental else
                             self.tokenizer.decode(text_ids, skip_special_tokens=config.skip_special_tokens))
                    if stop_token is not None:   # LMDeploy's: the stop token's text, special or not
                        text += self.tokenizer.decode([stop_token], skip_special_tokens=False)
                    if reason == 'error':
                        text = f'error: {out.error}'
                    held = history + len(ids) + len(generated) + (reason == 'stop' and stop_token is None)
                    self._record_history(session_id, sequence_end, held)
                yield GenOut(text, history, len(ids), len(generated), reason, out.token_ids, out.logprobs,
                             *await self._states(ids, generated, config, reason))
                if finished:
                    return
        finally:
            if not finished:  # the caller stopped listening: abort and free the request
                self.engine.cancel(session_id)

    async def _states(self, ids: list[int], generated: list[int], config: GenerationConfig, reason) -> tuple:
        """(logits, last hidden state) for the output that ends a request with ``reason``: the
        answer's when the request asks for them and ends with 'stop' or 'length'; else (None, None)."""
        if reason in ('stop', 'length') and wants_states(config):
            return await answer_states(self.engine, ids, generated, config)
        return None, None

    @staticmethod
    async def _drain_until_finished(queue: asyncio.Queue, last: EngineOutput) -> None:
        while last.finish_reason is None:
            last = await queue.get()

    def _record_history(self, session_id: int, sequence_end: bool, length: int) -> None:
        if sequence_end:
            self._history_len.pop(session_id, None)
        else:
            self._history_len[session_id] = length

    # ---- session control --------------------------------------------------------------------
    def stop_session(self, session_id: int) -> None:
        """Abort the session's running request; it finishes with 'abort'."""
        self._check_open()
        self.engine.cancel(session_id)

    def end_session(self, session_id: int) -> None:
        """Forget the session: its history and cached KV are freed."""
        self._check_open()
        self._history_len.pop(session_id, None)
        self.engine.end_session(session_id)

    def get_generator(self, stop: bool, session_id: int) -> 'AsyncEngine':
        """LMDeploy hands out an engine instance; ours is shared, so this only aborts when ``stop``."""
        if stop:
            self.stop_session(session_id)
        return self

    # ---- the synchronous API ------------------------------------------------------------------
    @property
    def _loop(self) -> BackgroundLoop:
        """The thread that runs the synchronous API's coroutines, started on first use."""
        self._check_open()
        if self._sync_loop is None:
            self._sync_loop = BackgroundLoop()
        return self._sync_loop

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
        items, single = _check_prompts(prompts)
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
        items, _ = _check_prompts(prompts)
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

    def get_ppl(self, input_ids: list[int] | list[list[int]]) -> list[float]:
        """Mean cross-entropy of each sequence (LMDeploy's get_ppl); a flat list is one sequence.
        Ids outside the vocabulary raise ``ValueError`` before anything runs."""
        self._check_open()
        if not input_ids:
            raise ValueError('input_ids is empty')
        batch = [input_ids] if isinstance(input_ids[0], int) else input_ids
        for i, seq in enumerate(batch):
            if len(seq) < 2:
                raise ValueError(f'sequence {i} needs at least 2 tokens for a perplexity')
            if len(seq) > self.session_len:
                raise ValueError(f'sequence {i} has {len(seq)} tokens, over session_len={self.session_len}')
        return self.engine.get_ppl([list(s) for s in batch])

    def update_weights(self, params) -> None:
        """Serve ``params`` from the next step on, without a restart (an RL loop's weight sync):
        the model's parameters in one device's layout and the served dtype, as ``nnx.state`` of
        ``lmdeploy_jax.load_model(path, dtype)``'s module holds them (or their ``nnx.to_pure_dict``).
        Every cached KV, the prefix cache's too, is dropped, so requests running meanwhile
        recompute theirs on the new weights. Raises ValueError naming a parameter that is
        missing, unknown or of another shape or dtype; NotImplementedError on the pytorch backend
        or at tp > 1; RuntimeError once closed."""
        self._check_open()
        update = getattr(self.engine, 'update_weights', None)
        if update is None:
            raise NotImplementedError(f'update_weights needs the turbomind backend, not {self.backend!r}')
        update(params)

    def close(self) -> None:
        """Stop the engine and free its devices; every later call raises ``RuntimeError``."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()
        if self._sync_loop is not None:
            self._sync_loop.close()
            self._sync_loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
