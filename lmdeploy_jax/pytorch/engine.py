"""The reference backend (``backend='pytorch'``): the Hugging Face transformers model run in torch.

It is the oracle the JAX engine is checked against, so exactness comes first: every request is
stepped on its own KV cache (one ``DynamicCache`` per session) with its own batch of one, so a
request gives the same tokens whether it runs alone or beside others. One engine thread owns all
state (sessions, caches, the model); other threads only put commands on its queue.
"""
from __future__ import annotations

import inspect
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

from ..checkpoint.errors import CheckpointError
from ..checkpoint.source import ModelSource
from ..engine_thread import ThreadedEngine, emit
from ..guided import GrammarCache, Guide, allowed_tokens
from ..engine_api import EngineOutput, EngineRequest, OutputCallback, QueueTimes, request_refusal
from ..messages import FinishReason, PytorchEngineConfig
from .sampling import next_token

logger = logging.getLogger('lmdeploy_jax')

DEFAULT_MAX_BATCH_SIZE = 64
# LMDeploy's PytorchEngineConfig fields this backend takes without effect: it runs transformers' own
# model and cache on one device, so they cannot change its answers (the JAX engine applies them)
IGNORED_SETTINGS = {'tp': 'it runs on one device', 'cache_max_entry_count': 'it has no paged KV pool',
                    'block_size': 'it has no paged KV pool', 'enable_prefix_caching': 'it has no paged KV pool'}


def ignored_settings_warning(config: PytorchEngineConfig) -> str | None:
    """The warning naming each ``IGNORED_SETTINGS`` field ``config`` sets away from its default, or None."""
    default = PytorchEngineConfig()
    changed = [f'{name}={getattr(config, name)!r} ({why})' for name, why in IGNORED_SETTINGS.items()
               if getattr(config, name) != getattr(default, name)]
    return 'the pytorch backend ignores ' + ', '.join(changed) if changed else None


def pick_device(device_type: str) -> torch.device:
    """CUDA when asked for and present; otherwise the CPU, with a warning when CUDA was asked for."""
    if device_type == 'cuda':
        if torch.cuda.is_available():
            return torch.device('cuda')
        logger.warning("device_type='cuda' but no CUDA device is available: the pytorch backend runs on the CPU")
    return torch.device('cpu')


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """'auto' keeps the checkpoint's dtype on a GPU, and float32 on the CPU (half precision is slow there)."""
    if dtype != 'auto':
        return getattr(torch, dtype)
    return 'auto' if device.type == 'cuda' else torch.float32


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of its own per request: the same seed repeats, None draws a fresh seed."""
    seed = secrets.randbits(63) if seed is None else seed
    return torch.Generator().manual_seed(seed % (1 << 64))


@dataclass(eq=False)
class _Session:
    history: list[int] = field(default_factory=list)  # prompts + generated tokens, stop tokens included
    cache: Any = None                  # the model's DynamicCache of history[:cached_len], filled in place
    cached_len: int = 0
    owner: '_Run | None' = None        # the request holding the session, waiting or running


@dataclass(eq=False)
class _Run:
    request: EngineRequest
    on_output: OutputCallback
    session: _Session
    generator: torch.Generator
    num_generated: int = 0


def _check_loading(hf_dir: str, loading: dict) -> None:
    """CheckpointError naming ``hf_dir`` and the tensors when transformers' loading report lists
    parameters missing from the checkpoint (it would have initialised them at random) or of another
    shape."""
    for key, fault in (('missing_keys', 'missing from the checkpoint'),
                       ('mismatched_keys', 'of another shape than the config gives')):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading.get(key) or ())
        if names:
            raise CheckpointError(hf_dir, f'tensors {fault}: {", ".join(names)}')


def _transformers_architectures() -> set[str]:
    """The causal-LM architectures transformers itself implements."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class PytorchEngine(ThreadedEngine):
    """``InferenceEngine`` over ``AutoModelForCausalLM``; see the module docstring."""

    def __init__(self, source: ModelSource, config: PytorchEngineConfig | None = None):
        config = config or PytorchEngineConfig()
        if (warning := ignored_settings_warning(config)) is not None:
            logger.warning(warning)
        self.device = pick_device(config.device_type)
        if source.config_dict().get('auto_map') and source.architecture not in _transformers_architectures():
            raise ValueError(f'architecture {source.architecture!r} ships its own modeling code (auto_map in '
                             f'{source.config_path}), which the pytorch reference backend does not run; use the '
                             "turbomind (JAX) backend")
        model, loading = AutoModelForCausalLM.from_pretrained(
            source.hf_dir, dtype=pick_dtype(config.dtype, self.device), output_loading_info=True,
            trust_remote_code=False)
        _check_loading(source.hf_dir, loading)
        self.model = model.to(self.device).eval()
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); support both spellings
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = 'cache' if 'cache' in params else 'past_key_values'
        text_config = self.model.config.get_text_config()
        self.vocab_size = text_config.vocab_size
        self.session_len = config.session_len or text_config.max_position_embeddings
        self.max_batch_size = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        self._guide = Guide(GrammarCache(source.hf_dir, self.vocab_size))     # response_format
        self._queue_times = QueueTimes()
        logger.info('pytorch backend: %s on %s (%s), session_len=%d, max_batch_size=%d', source.given,
                    self.device, self.model.dtype, self.session_len, self.max_batch_size)

        self._sessions: dict[int, _Session] = {}
        self._waiting: deque[_Run] = deque()
        self._running: list[_Run] = []
        self._start_thread('pytorch engine')

    def _release(self) -> None:
        self.model = None
        if self.device.type == 'cuda':
            torch.cuda.empty_cache()

    def num_running(self) -> int:
        with self._lock:
            return len(self._running)

    def num_waiting(self) -> int:
        """Requests submitted but not running yet (queued or admitted to wait)."""
        with self._lock:
            return self._num_queued + len(self._waiting)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {'running': len(self._running), 'waiting': self._num_queued + len(self._waiting)}

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            try:
                for kind, payload in self._drain_commands(block=not (self._running or self._waiting)):
                    if kind == 'stop':
                        self._shutdown()
                        return
                    self._handle(kind, payload)
                self._admit()
                self._step()
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                logger.exception('pytorch backend: unexpected failure in the engine loop')

    def _handle(self, kind: str, payload) -> None:
        if kind == 'submit':
            run = None
            try:
                run = self._accept(*payload)
            except Exception as exc:  # noqa: BLE001 - a malformed request fails alone
                logger.exception('pytorch backend: could not accept a request')
                emit(payload[1], EngineOutput([], finish_reason='error', error=f'{type(exc).__name__}: {exc}'))
            self._count_taken(None if run is None else lambda: self._waiting.append(run))
        elif kind == 'cancel':
            self._abort(payload)
        elif kind == 'end':
            self._abort(payload)
            self._sessions.pop(payload, None)
        elif kind in ('ppl', 'states'):
            *args, result = payload
            try:
                result.set_result((self._ppl if kind == 'ppl' else self._states)(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                result.set_exception(exc)

    def _accept(self, request: EngineRequest, on_output: OutputCallback) -> _Run | None:
        """Check a request and attach it to its session: the run that waits for a running slot, or
        None when the request is already answered (refused, or nothing to generate)."""
        error = self._refusal(request) or self._guide.start(request)
        if error is not None:
            emit(on_output, EngineOutput([], finish_reason='error', error=error))
            return None
        session = self._sessions.get(request.session_id)
        if session is None or request.sequence_start:
            session = self._sessions[request.session_id] = _Session()
        session.history.extend(request.input_ids)
        run = _Run(request, on_output, session, seeded_generator(request.gen_config.random_seed))
        session.owner = run
        if request.gen_config.max_new_tokens == 0 or len(session.history) >= self.session_len:
            self._finish(run, 'length')
            return None
        return run

    def _refusal(self, request: EngineRequest) -> str | None:
        """Why the request cannot run, or None; a refused request leaves its session as it was."""
        session = self._sessions.get(request.session_id)
        held = 0 if session is None or request.sequence_start else len(session.history)
        return request_refusal(request, vocab_size=self.vocab_size, session_len=self.session_len,
                               busy=session is not None and session.owner is not None, held=held)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            with self._lock:
                run = self._waiting.popleft()
                self._running.append(run)
            self._queue_times.started(run.request)

    def take_queue_times(self) -> list[float]:
        return self._queue_times.take()

    def _step(self) -> None:
        for run in list(self._running):
            try:
                self._advance(run)
            except Exception as exc:  # noqa: BLE001 - one request fails, the others go on
                logger.exception('pytorch backend: request of session %d failed', run.request.session_id)
                self._finish(run, 'error', error=f'{type(exc).__name__}: {exc}', forget=True)

    def _advance(self, run: _Run) -> None:
        """Feed the session's uncached tokens, sample one token, report it or finish."""
        session, gen = run.session, run.request.gen_config
        if session.cache is None:
            session.cache = DynamicCache(config=self.model.config)
        new_ids = torch.tensor([session.history[session.cached_len:]], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=new_ids, use_cache=True, logits_to_keep=1,
                             **{self._cache_kwarg: session.cache})
        session.cached_len = len(session.history)
        logits = out.logits[0, -1].float().cpu()
        bitmask = self._guide.bitmask([run.request], 1)
        if bitmask is not None:
            logits = logits.masked_fill(torch.from_numpy(~allowed_tokens(bitmask[0], logits.shape[-1])), float('-inf'))
        token, logprobs = next_token(logits, gen, session.history, run.num_generated, run.generator)
        session.history.append(token)
        run.num_generated += 1
        if token in (gen.stop_token_ids or ()):
            kept = [token] if gen.include_stop_str_in_output else []   # LMDeploy's: the stop token is reported
            self._finish(run, 'stop', kept, logprobs=None if logprobs is None else [logprobs] * len(kept))
            return
        verdict = self._guide.accept(run.request, token) if self._guide.is_guided(run.request) else 'ok'
        if verdict != 'ok':
            self._finish(run, 'stop' if verdict == 'terminated' else 'error', logprobs=None if logprobs is None else [],
                         error=None if verdict == 'terminated' else f'token {token} breaks the response_format')
            return
        out_logprobs = None if logprobs is None else [logprobs]
        if run.num_generated >= gen.max_new_tokens or len(session.history) >= self.session_len:
            self._finish(run, 'length', [token], out_logprobs)
        elif not emit(run.on_output, EngineOutput([token], out_logprobs)):
            self._finish(run, 'error', error='the output callback failed')

    def _abort(self, session_id: int) -> None:
        session = self._sessions.get(session_id)
        if session is not None and session.owner is not None:
            self._finish(session.owner, 'abort')

    def _finish(self, run: _Run, reason: FinishReason, token_ids: list[int] | None = None,
                logprobs: list | None = None, error: str | None = None, forget: bool = False) -> None:
        """End a request: free its slot and session, then send its last output."""
        with self._lock:
            if run in self._running:
                self._running.remove(run)
            elif run in self._waiting:
                self._waiting.remove(run)
        session, sid = run.session, run.request.session_id
        session.owner = None
        self._guide.stop(run.request)
        if (forget or run.request.sequence_end) and self._sessions.get(sid) is session:
            del self._sessions[sid]
        emit(run.on_output, EngineOutput(token_ids or [], logprobs, reason, error))

    def _ppl(self, seqs: list[list[int]]) -> list[float]:
        losses = []
        for ids in seqs:
            ids_t = torch.tensor([ids], device=self.device)
            with torch.inference_mode():
                logits = self.model(input_ids=ids_t, use_cache=False).logits[0, :-1].float()
            losses.append(float(F.cross_entropy(logits, ids_t[0, 1:])))
        return losses

    def _states(self, seqs: list[list[int]], logits: bool, hidden: bool) -> list[tuple]:
        """``InferenceEngine.token_states``: transformers' logits and last hidden state (its final
        norm's output), float32 numpy."""
        states = []
        for ids in seqs:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False,
                                 output_hidden_states=hidden)
            states.append((out.logits[0].float().cpu().numpy() if logits else None,
                           out.hidden_states[-1][0].float().cpu().numpy() if hidden else None))
        return states

    def _shutdown(self) -> None:
        for run in list(self._running) + list(self._waiting):
            self._finish(run, 'abort')
        self._sessions.clear()

