"""LMDeploy's AsyncEngine: prompts in, text out, over any backend of ``engine_api``.

It owns everything user-facing: chat templates, tokenization, stop strings, incremental
detokenization and ``Response``s. Here: start-up (model, tokenizer, chat template, backend),
``generate`` (one request of a session: settings and prompt checked, stop words resolved, the
request run by ``request_run.run_request``), session control, and the backend's ``get_ppl`` and
``update_weights``. The prompts' checks and token ids are ``prompts.py``'s; the synchronous calls
(``batch_infer``, ``stream_infer``, ``chat``) are ``sync_api.py``'s.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import time
from typing import AsyncIterator

from ..backends import BACKENDS, check_supported, create_backend
from ..chat_template import get_chat_template
from ..chat_template_kwargs import resolve_template_kwargs
from ..checkpoint.source import resolve_model
from ..engine_api import EngineRequest
from ..messages import GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig
from ..models.registry import is_supported
from ..text_checks import require_utf8
from ..tokenizer import Tokenizer
from .output_states import check_context
from .prompts import prompt_ids
from .request_config import merge_gen_config, resolve_stops
from .request_run import GenOut, run_request
from .sync_api import SyncAPI
from .unsupported import refuse_unknown_keywords

__all__ = ['AsyncEngine', 'GenOut']

logger = logging.getLogger('lmdeploy_jax')


def _timed(what: str, fn, *args):
    """``fn(*args)``, logging how long it took (start-up phases)."""
    start = time.perf_counter()
    result = fn(*args)
    logger.info('%s ready in %.1f s', what, time.perf_counter() - start)
    return result


class AsyncEngine(SyncAPI):
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

    # ---- the async core: one request of a session ----------------------------------------
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
        ids = prompt_ids(messages, chat_template=self.chat_template, tokenizer=self.tokenizer,
                         vocab_size=self.vocab_size, sequence_start=sequence_start, do_preprocess=do_preprocess,
                         input_ids=input_ids, tools=tools, template_kwargs=template_kwargs)
        room = self.session_len - history - len(ids)
        if room < 0:
            yield GenOut(f'error: the prompt has {len(ids)} tokens, which with {history} tokens of history '
                         f'exceeds session_len={self.session_len}', history, len(ids), 0, 'error')
            return
        config, text_stops = resolve_stops(config.replace(max_new_tokens=min(config.max_new_tokens, room)),
                                           self.chat_template.stop_words, self.tokenizer, self._eos_ids)
        request = EngineRequest(session_id, ids, config, sequence_start, sequence_end)
        async for out in run_request(self.engine, self.tokenizer, request, text_stops, history,
                                     incremental=stream_response or bool(text_stops),
                                     on_finish=lambda held: self._record_history(session_id, sequence_end, held)):
            yield out

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

    # ---- passthroughs to the backend -----------------------------------------------------
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
        missing, unknown or of another shape or dtype; NotImplementedError on the pytorch backend;
        RuntimeError once closed."""
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
        self._close_loop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
