"""``JaxEngine``: the ``InferenceEngine`` of ``backend='turbomind'``, one thread driving the device.

Other threads only put commands on a queue. The engine thread takes them between steps, asks the
scheduler for a plan and dispatches it. While the device runs it, the thread
prepares the call the scheduler chains behind it (if any, ``Scheduler.chain``: a prefill step for
waiting prompts or a decode call) and hands it to the launcher thread, takes the commands that
arrived, then waits for the first call's sampled tokens (already on their way to the host) and
hands them to the scheduler, which reports them through the request callbacks. The chained call,
still in flight, is the next one whose results it takes.

Why a launcher thread: launching a compiled call keeps the calling thread busy until XLA has
queued all of its work (its loops over steps and layers run on the host), so a chained call
launched on the engine thread would hold back the results of the call before it. Only the launch
runs there; the host arrays are built on the engine thread, which alone touches the scheduler.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax

from ..checkpoint.source import ModelSource
from ..engine_api import EngineOutput, EngineRequest, OutputCallback
from ..engine_thread import ThreadedEngine, emit
from ..guided import GrammarCache, Guide
from ..messages import TurbomindEngineConfig
from .. import settings
from ..models import load_model
from ..parallel import agree_min, init_distributed, local_devices, make_tp_mesh
from .block_manager import BlockManager
from .buckets import make_buckets
from .kv_pool import cache_state_spec, free_device_bytes, plan_num_blocks
from .runner import ModelRunner
from .scheduler import Scheduler, StepPlan
from .weight_swap import place_like

logger = logging.getLogger('lmdeploy_jax')

DEFAULT_MAX_BATCH_SIZE = {'gpu': 256, 'cpu': 16}
BUCKET_GROWTH = {'cpu': 4}                     # fewer compiled shapes where compiling is slow
# decode steps per compiled call (one host round trip per call); more hides more host time but
# delays newly arrived prompts and wastes the steps after a row's finish
DEFAULT_DECODE_STEPS = 8
_DEFERRED = ('ppl', 'states', 'stop', 'weights')     # commands that must wait until no step is in flight


class JaxEngine(ThreadedEngine):
    """The JAX engine. Bucket lists (``decode_batch``, ``prefill_tokens``, ``prefill_batch``)
    override the defaults of ``buckets.make_buckets``: fewer shapes, faster start-up.
    ``decode_steps`` is how many decode steps one compiled call runs (``multistep.py``)."""

    def __init__(self, source: ModelSource, config: TurbomindEngineConfig | None = None, *,
                 decode_batch: list[int] | None = None, prefill_tokens: list[int] | None = None,
                 prefill_batch: list[int] | None = None, decode_steps: int = DEFAULT_DECODE_STEPS):
        if decode_steps < 1:
            raise ValueError(f'decode_steps must be >= 1, got {decode_steps}')
        config = config or TurbomindEngineConfig()
        env = settings.current()
        start = time.perf_counter()
        init_distributed(config.dist_init_addr, config.nnodes, config.node_rank, config.devices)
        mesh = make_tp_mesh(config.tp) if config.tp > 1 else None
        devices = local_devices(mesh) if mesh is not None else jax.devices()[:1]
        device = min(devices, key=lambda d: free_device_bytes(d) or 0)
        logger.info('%d %s device(s) ready in %.1f s', len(devices), device.platform, time.perf_counter() - start)
        start = time.perf_counter()
        model = load_model(source, config.dtype, mesh, config.rope_scaling_factor, config.communicator == 'cuda-ipc',
                           ep=config.ep)
        logger.info('loaded the weights in %.1f s', time.perf_counter() - start)
        spec = model.spec
        self.vocab_size = spec.vocab_size
        self.session_len = config.session_len or spec.max_position_embeddings
        self.max_batch_size = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE.get(device.platform, 256)
        block_size = config.cache_block_seq_len
        num_blocks = agree_min(plan_num_blocks(spec, block_size, self.session_len, config.cache_max_entry_count,
                                               config.num_cache_blocks, device, config.tp, config.quant_policy))
        buckets = make_buckets(self.max_batch_size, config.max_prefill_token_num, self.session_len, block_size,
                               decode_batch, prefill_tokens, prefill_batch,
                               growth=BUCKET_GROWTH.get(device.platform, 2))
        cache_spec = cache_state_spec(spec, num_blocks, block_size, self.max_batch_size, mesh, config.quant_policy)
        self._runner = ModelRunner(model, cache_spec, buckets, block_size, config.compilation_cache_dir, decode_steps,
                                   env, config.enable_mixed_chunk)
        self._runner.warmup()
        self._scheduler = Scheduler(BlockManager(num_blocks, block_size, config.enable_prefix_caching), buckets,
                                    self.session_len, self.max_batch_size, spec.vocab_size, decode_steps,
                                    Guide(GrammarCache(source.hf_dir, spec.vocab_size)), config.enable_mixed_chunk)
        logger.info('jax engine: %s (%s, %s), session_len=%d, max_batch_size=%d, prefix caching %s, mixed steps %s',
                    source.given, spec.architecture, spec.dtype, self.session_len, self.max_batch_size,
                    'on' if config.enable_prefix_caching else 'off', 'on' if config.enable_mixed_chunk else 'off')
        self._deferred: list = []
        # where the engine thread's time goes (stats()): calls dispatched, chained ones among them,
        # and seconds spent planning, dispatching, waiting for results and taking them
        self._calls = self._chained_calls = 0
        self._seconds = dict.fromkeys(('schedule', 'dispatch', 'result_wait', 'complete'), 0.0)
        self._launcher = ThreadPoolExecutor(1, thread_name_prefix='jax launch')
        self._start_thread('jax engine')

    def _release(self) -> None:
        self._launcher.shutdown()
        self._runner = None

    # ---- introspection (approximate while the engine runs) ----

    def num_free_blocks(self) -> int:
        return self._scheduler.blocks.num_free()

    def num_total_blocks(self) -> int:
        """Blocks sequences can use (block 0, the padding target, excluded)."""
        return self._scheduler.blocks.num_blocks - 1

    def num_running(self) -> int:
        return len(self._scheduler.running)

    def num_waiting(self) -> int:
        """Requests submitted but not running yet (queued or admitted to wait)."""
        return self._num_queued + len(self._scheduler.waiting)

    def take_queue_times(self) -> list[float]:
        return self._scheduler.queue_times.take()

    def stats(self) -> dict[str, int]:
        s = self._scheduler
        return {'running': self.num_running(), 'waiting': self.num_waiting(),
                'kv_blocks_free': self.num_free_blocks(), 'kv_blocks_total': self.num_total_blocks(),
                'prefix_hit_blocks': s.blocks.prefix_hit_blocks, 'prefilled_tokens': s.prefilled_tokens,
                'preemptions': s.num_preemptions, 'calls': self._calls, 'chained_calls': self._chained_calls,
                'mixed_steps': s.mixed_steps,
                **{f'{phase}_s': round(t, 3) for phase, t in self._seconds.items()}}

    # ---- the engine thread ----

    def _loop(self) -> None:
        in_flight = None          # (plan, device outputs) dispatched, results not taken yet
        while True:
            try:
                if in_flight is None:
                    idle = not self._scheduler.has_work() and not self._deferred
                    self._take_commands(block=idle)
                    for kind, payload in self._pop_deferred():
                        if kind == 'stop':
                            self._scheduler.abort_all()
                            return
                        self._run_deferred(kind, payload)
                    with self._timed('schedule'):
                        plan = self._scheduler.schedule()
                    in_flight = self._dispatch(plan) if plan is not None else None
                if in_flight is not None:
                    in_flight = self._advance(*in_flight)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                logger.exception('jax engine: unexpected failure in the engine loop')
                in_flight = None

    def _advance(self, plan: StepPlan, out) -> tuple | None:
        """While ``plan`` runs: launch the call chained behind it if the scheduler plans one
        (queued before ``plan``'s results reach the host), take the commands that arrived, then
        take ``plan``'s results. Returns the chained call, now in flight."""
        self._take_commands(block=False)
        with self._timed('schedule'):
            chained = self._scheduler.chain(plan) if not self._deferred else None
        launched = self._dispatch(chained, background=True) if chained is not None else None
        self._take_commands(block=False)           # host work while the device runs
        results, error = self._fetch(out)
        if error is None:
            self._take_results(plan, results)
        following = self._launched(chained, launched) if launched is not None else None
        if error is not None:
            self._fail(plan, error)                # only now: recovering may replace the cache
            if following is not None:
                self._complete(*following)         # it ran on the failed call's outputs: fails too
            following = None
        return following

    def _dispatch(self, plan: StepPlan, background: bool = False) -> tuple | Future | None:
        """Prepare the call's host arrays and launch it: here, returning (plan, device outputs), or
        (a call chained behind the one in flight) on the launcher thread, returning its future."""
        self._calls += 1
        self._chained_calls += background
        try:
            with self._timed('dispatch'):
                call = self._runner.prepare(plan, self._scheduler.bitmask(plan))
                if background:
                    return self._launcher.submit(self._runner.launch, call)
                return plan, self._runner.launch(call)
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            self._fail(plan, exc)
            return None

    def _launched(self, plan: StepPlan, launch: Future) -> tuple | None:
        """The chained call's (plan, device outputs) once the launcher has queued it."""
        try:
            with self._timed('dispatch'):
                return plan, launch.result()
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            self._fail(plan, exc)
            return None

    def _complete(self, plan: StepPlan, out) -> bool:
        """Hand the call's results to the scheduler; False if the call failed."""
        results, error = self._fetch(out)
        if error is not None:
            self._fail(plan, error)
            return False
        self._take_results(plan, results)
        return True

    def _fetch(self, out) -> tuple:
        """(host copies of a call's outputs, None), or (None, the error) if the call failed."""
        try:
            with self._timed('result_wait'):
                return jax.device_get(out), None
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            return None, exc

    def _take_results(self, plan: StepPlan, results) -> None:
        with self._timed('complete'):
            self._scheduler.complete(plan, results)

    @contextlib.contextmanager
    def _timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - start

    def _fail(self, plan: StepPlan, exc: Exception) -> None:
        logger.exception('jax engine: a step failed')
        self._scheduler.fail(plan, f'{type(exc).__name__}: {exc}')
        if self._runner.recover_cache():
            logger.warning('jax engine: the KV cache was lost with the failed step; sequences recompute')
            self._scheduler.forget_all_kv()

    def _pop_deferred(self) -> list:
        deferred, self._deferred = self._deferred, []
        return deferred

    def _take_commands(self, block: bool) -> None:
        """Handle queued submits, cancels and session ends; keep the rest for between steps."""
        for kind, payload in self._drain_commands(block):
            if kind in _DEFERRED:
                self._deferred.append((kind, payload))
            elif kind == 'submit':
                self._submit(*payload)
            elif kind == 'cancel':
                self._scheduler.cancel(payload)
            elif kind == 'end':
                self._scheduler.end_session(payload)

    def _submit(self, request: EngineRequest, on_output: OutputCallback) -> None:
        """Queue a request with the scheduler; one that breaks it fails alone, never the engine loop
        (which would drop the call in flight)."""
        try:
            self._scheduler.submit(request, on_output)
        except Exception as exc:  # noqa: BLE001 - a malformed request fails alone
            logger.exception('jax engine: could not accept a request')
            emit(on_output, EngineOutput([], finish_reason='error', error=f'{type(exc).__name__}: {exc}'))
        self._count_taken()

    def update_weights(self, params) -> None:
        """``AsyncEngine.update_weights``: ``params`` checked and placed on the caller's thread
        (old and new weights both on the device until the swap; arrays already placed as the
        served ones are not copied; over a tensor-parallel mesh the fused projections are
        regrouped for it), swapped in by the engine thread between steps."""
        placed = place_like(params, self._runner.model)
        result: Future = Future()
        if not self._command('weights', (placed, result)):
            raise RuntimeError(f'the {self._thread.name} is closed')
        result.result()

    def _swap_weights(self, params, result: Future) -> None:
        self._runner.model = dataclasses.replace(self._runner.model, params=params)
        self._scheduler.forget_all_kv()
        result.set_result(None)

    def _run_deferred(self, kind: str, payload: tuple) -> None:
        """A command that waited for no step to be in flight: a weight swap, ``get_ppl`` or
        ``token_states``."""
        if kind == 'weights':
            self._swap_weights(*payload)
        elif kind == 'ppl':
            seqs, result = payload
            self._over_sequences(seqs, result, self._runner.sequences.perplexity)
        else:
            seqs, logits, hidden, result = payload
            self._over_sequences(seqs, result, lambda ids, blocks: self._runner.sequences.token_states(
                ids, blocks, logits, hidden))

    def _over_sequences(self, seqs: list[list[int]], result: Future, work) -> None:
        """``work(ids, blocks)`` for each sequence, in KV blocks reserved for it; the list of their
        results (or the first exception) to ``result``."""
        try:
            outputs = []
            for ids in seqs:
                blocks = self._scheduler.reserve(-(-len(ids) // self._runner.block_size))
                try:
                    outputs.append(work(ids, blocks))
                finally:
                    self._scheduler.release(blocks)
            result.set_result(outputs)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            result.set_exception(exc)
