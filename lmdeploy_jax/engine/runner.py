"""The compiled steps: one executable per bucket shape, built at start-up, the KV pool donated.

Prefill shapes run one step; decode shapes run ``decode_steps`` steps per call (``multistep.py``),
their outputs carrying a leading [steps] axis. Each decode shape has two executables: one with the
general sampler and a greedy-only one, taken when no row of the call samples or asks for logprobs
(``sampler.needs_general``; the sampler says why this is chosen on the host). ``step`` is the pure
function ``(params, cache, batch, sampling, rows) -> (cache, sampled)``: it writes the batch's
tokens and KV into the pool, runs the model, takes each row's last-position logits in float32,
samples on the device, and keeps each row's sampled token in the pool (``CacheState.last``, by row
slot), where a decode call queued behind it reads its inputs. Every shape of the bucket set is
compiled ahead of time, so serving never compiles; a shape outside the set is a bug and raises.
The exception is guided decoding (``lmdeploy_jax/guided.py``): a decode call with a guided row takes one more
input, the token bitmask, and runs an executable of its own (``GUIDED_KINDS``), compiled (or
loaded from the executable store) when a call first needs it, so that engines that never guide
compile nothing more and unguided calls move no bitmask.
With mixed steps on (``TurbomindEngineConfig.enable_mixed_chunk``), each prefill shape (Bp, T) has
a twin of kind 'mixed': one step whose input is a ``MixedBatch`` of a decode segment of
``buckets.max_batch`` rows (one token each; unused rows are padding) and the prefill segment
[Bp, T], general sampler; its outputs are [max_batch + Bp] rows, decode rows first.
``get_ppl`` and ``token_states`` run whole sequences off the serving path (``sequence_forward.py``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from .. import settings
from ..models import LoadedModel, MixedBatch, StepBatch
from ..parallel import rules
from .buckets import Buckets
from .kv_pool import CacheState, RowSlots, allocate_cache_state
from . import multistep
from .executable_store import ExecutableStore, compile_tracked, describe_inputs
from ..guided import bitmask_words
from .sampler import SampleOutput, SamplingParams, apply_bitmask, host_sampling_params, needs_general, sample
from .scheduler import StepPlan
from .sequence_forward import SequenceForward
from .xla_flags import executable_options, is_small_batch_tp_decode

logger = logging.getLogger('lmdeploy_jax')

# decode kinds with a token bitmask input -> (general sampler, one step a call instead of decode_steps)
GUIDED_KINDS = {'guided_decode': (True, False), 'guided_greedy_decode': (False, False),
                'guided_step': (True, True), 'guided_greedy_step': (False, True)}


def enable_compilation_cache(path: str | None, env: settings.Settings | None = None) -> None:
    """Turn on JAX's persistent compilation cache so the second start skips compiling.

    A directory the process already set (e.g. by the user) is kept unless ``path`` names one;
    the default is ``env.compilation_cache_dir`` (``settings.py``; default: the current settings).
    """
    if path is None and getattr(jax.config, 'jax_compilation_cache_dir', None):
        return
    path = os.path.expanduser(path or (env or settings.current()).compilation_cache_dir)
    os.makedirs(path, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
    logger.info('JAX compilation cache: %s', path)


def host_step_batch(rows: list[tuple[list[int], int, list[int]]], shape: tuple[int, int], max_blocks: int,
                    block_size: int) -> StepBatch:
    """Numpy StepBatch of ``shape`` from (tokens to feed, position of the first, the row's blocks)."""
    b, t = shape
    batch = StepBatch(token_ids=np.zeros((b, t), np.int32), positions=np.zeros((b, t), np.int32),
                      slot_mapping=np.zeros((b, t), np.int32), block_tables=np.zeros((b, max_blocks), np.int32),
                      context_lens=np.zeros(b, np.int32), query_lens=np.zeros(b, np.int32))
    for i, (tokens, start, blocks) in enumerate(rows):
        n = len(tokens)
        pos = np.arange(start, start + n)
        table = np.asarray(blocks, np.int32)
        batch.token_ids[i, :n] = tokens
        batch.positions[i, :n] = pos
        batch.slot_mapping[i, :n] = table[pos // block_size] * block_size + pos % block_size
        batch.block_tables[i, :len(table)] = table
        batch.context_lens[i] = start + n
        batch.query_lens[i] = n
    return batch


def _abstract(tree):
    """Shapes, dtypes and, for device arrays, shardings (a tensor-parallel cache stays sharded)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
                        tree)


def _step(model: LoadedModel, block_size: int, general: bool, params, cache: CacheState, batch: StepBatch | MixedBatch,
          sp: SamplingParams, rows: RowSlots, bitmask: jax.Array | None = None) -> tuple[CacheState, SampleOutput]:
    tokens = cache.tokens.at[batch.slot_mapping.reshape(-1)].set(batch.token_ids.reshape(-1))
    hidden, kv = model.forward(params, cache.kv, batch)
    logits = model.compute_logits(params, batch.last_hidden(hidden))

    def history():
        slots = (batch.block_tables[:, :, None] * block_size + jnp.arange(block_size)).reshape(batch.num_rows, -1)
        return tokens[slots], jnp.arange(slots.shape[1])[None, :] < batch.context_lens[:, None]

    if general and model.mesh is not None:
        # The general sampler scatters penalties and masks into the vocabulary, which the lm_head
        # shards over the mesh; XLA's GPU backend runs such a partitioned scatter as a serial loop
        # of small kernels, so it samples whole rows. The logits are pinned to the lm_head's
        # vocabulary split first, so that what is gathered is the [B, vocab] logits: with the
        # replicated constraint alone XLA may all-gather the whole lm_head weight instead.
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(model.mesh, rules.VOCAB_LOGITS))
        logits = jax.lax.with_sharding_constraint(logits, NamedSharding(model.mesh, rules.REPLICATED))
    logits = logits.astype(jnp.float32)
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    out = sample(logits, history, sp, general)
    return CacheState(kv, tokens, cache.last.at[rows.slot].set(out.token)), out


def _host_trees_joined(parts: list):
    """Host pytrees of one structure (sampling params, row slots) joined along their rows."""
    return jax.tree.map(lambda *leaves: np.concatenate(leaves), *parts)


@dataclasses.dataclass
class PreparedCall:
    """A call ready to launch: its executable, host arrays and where the executable takes them."""
    executable: jax.stages.Compiled
    batch: StepBatch
    sp: SamplingParams
    rows: RowSlots
    host_shardings: tuple | None
    bitmask: np.ndarray | None = None       # a guided call's token bitmask [rows, words] (int32)

    def host_inputs(self) -> tuple:
        return (self.batch, self.sp, self.rows) + ((self.bitmask,) if self.bitmask is not None else ())


class ModelRunner:
    """Owns the params, the device KV pool and the compiled steps. Used from the engine thread;
    ``launch`` (device work only) also from the engine's launcher thread, one call at a time."""

    def __init__(self, model: LoadedModel, cache_spec: CacheState, buckets: Buckets, block_size: int,
                 compilation_cache_dir: str | None = None, decode_steps: int = 1,
                 env: settings.Settings | None = None, mixed: bool = False):
        """``cache_spec``: the pool's shapes and shardings (``kv_pool.cache_state_spec``); the pool
        itself is allocated by ``warmup``, after compiling. ``env``: the process settings the
        engine resolved (default: ``settings.current()``); they key the executable store and
        carry the user's ``XLA_FLAGS``. ``mixed``: compile the mixed twin of every prefill shape."""
        self.env = env or settings.current()
        enable_compilation_cache(compilation_cache_dir, self.env)
        self.model, self.cache_spec, self.buckets, self.block_size = model, cache_spec, buckets, block_size
        self.cache: CacheState | None = None
        self.row_slots = cache_spec.last.shape[0] - 1     # running sequences at most; the last entry is padding's
        self.decode_steps = decode_steps
        self.mixed_rows = buckets.max_batch if mixed else 0    # decode segment of a mixed step; 0: none

        def decode(general: bool, unrolled: bool, steps: int = decode_steps):
            step = functools.partial(_step, dataclasses.replace(model, layer_unroll=True) if unrolled else model,
                                     block_size, general)
            return jax.jit(functools.partial(multistep.decode_steps, step, block_size, steps),
                           donate_argnums=(1,))

        # by (kind, layers unrolled): prefill and decode run the general sampler, greedy_decode the
        # greedy-only one; some small-batch tensor-parallel decode calls unroll (``_unrolled``)
        self._functions = {('prefill', False): jax.jit(functools.partial(_step, model, block_size, True),
                                                       donate_argnums=(1,))}
        self._functions['mixed', False] = self._functions['prefill', False]    # traced for a MixedBatch
        self._functions.update({(kind, unrolled): decode(kind == 'decode', unrolled)
                                for kind in ('decode', 'greedy_decode') for unrolled in (False, True)})
        self._functions.update({(kind, unrolled): decode(general, unrolled, 1 if one_step else decode_steps)
                                for kind, (general, one_step) in GUIDED_KINDS.items() for unrolled in (False, True)})
        # (kind, shape) -> executable: a decode shape may equal a one-token prefill shape
        self._executables: dict[tuple[str, tuple[int, int]], jax.stages.Compiled] = {}
        self._host_shardings: dict[tuple[str, tuple[int, int]], tuple] = {}
        self.store_counts = {'loaded': 0, 'saved': 0}      # executables the last warmup took from / put in the store
        self.sequences = SequenceForward(self)             # get_ppl and token_states

    def precision(self):
        """float32 models compute in float32: a GPU would otherwise run their dots as TF32."""
        if self.model.spec.dtype == jnp.float32:
            return jax.default_matmul_precision('highest')
        return contextlib.nullcontext()

    def warmup(self) -> None:
        """Compile every bucket shape now, so serving never compiles, then allocate the pool (not
        before: compiling autotunes on scratch device memory). Shapes found in the executable
        store (``executable_store.py``) are loaded, not traced; the others are traced one after
        another, compiled in parallel threads (XLA releases the GIL) and stored."""
        start = time.perf_counter()
        shapes = ([(kind, (b, 1)) for b in self.buckets.decode_batch for kind in ('decode', 'greedy_decode')]
                  + [('prefill', s) for s in self.buckets.prefill]
                  + [('mixed', s) for s in self.buckets.prefill if self.mixed_rows])
        inputs = {key: _abstract(self._example_inputs(key)) for key in shapes}
        descriptions = {key: self._describe(key, inputs[key]) for key in shapes}
        store = self._store()
        if store is not None:
            stored = {key: store.load(descriptions[key]) for key in shapes}
            self._executables.update({key: ex for key, ex in stored.items() if ex is not None})
        lowered = {key: self.lower(key, inputs[key]) for key in shapes if key not in self._executables}
        traced = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            compiled = dict(zip(lowered, pool.map(lambda key: compile_tracked(lowered[key], self.options(key)),
                                                  lowered)))
        self._executables.update({key: executable for key, (executable, _) in compiled.items()})
        self.store_counts = {'loaded': len(shapes) - len(lowered), 'saved': 0}
        if store is not None:
            for key, (executable, fresh) in compiled.items():
                if fresh:
                    store.save(descriptions[key], executable)
                    self.store_counts['saved'] += 1
            if self.store_counts['saved']:
                store.trim()
        self.cache = allocate_cache_state(self.cache_spec)
        logger.info('%d step shapes ready in %.1f s (%d loaded from the executable store; loading and tracing '
                    '%.1f s): decode batches %s (%d steps a call), prefill (rows, tokens) %s%s',
                    len(self._executables), time.perf_counter() - start, self.store_counts['loaded'],
                    traced - start, list(self.buckets.decode_batch), self.decode_steps, list(self.buckets.prefill),
                    f', each with a mixed twin of {self.mixed_rows} decode rows' if self.mixed_rows else '')

    def _example_inputs(self, key: tuple[str, tuple[int, int]]) -> tuple:
        """Host inputs of the call ``key`` = (kind, shape) (batch, sampling, row slots, and a guided
        kind's bitmask): what it is traced with."""
        kind, shape = key
        batch = host_step_batch([], shape, self.buckets.max_blocks, self.block_size)
        if kind == 'mixed':
            decode = host_step_batch([], (self.mixed_rows, 1), self.buckets.max_blocks, self.block_size)
            rows = self.mixed_rows + shape[0]
            return MixedBatch(decode, batch), host_sampling_params([], rows), self._row_slots([], rows)
        inputs = batch, host_sampling_params([], shape[0]), self._row_slots([], shape[0])
        if kind in GUIDED_KINDS:
            inputs += (np.full((shape[0], bitmask_words(self.model.spec.vocab_size)), -1, np.int32),)
        return inputs

    def lower(self, key: tuple[str, tuple[int, int]], inputs: tuple | None = None) -> jax.stages.Lowered:
        """The step ``key`` = (kind, (rows, tokens)) traced and lowered for this engine's params and
        pool; ``inputs``: its abstract host inputs (default: made here)."""
        if inputs is None:
            inputs = _abstract(self._example_inputs(key))
        with self.precision():
            return self._functions[key[0], self._unrolled(key)].lower(self.model.params, self.cache_spec, *inputs)

    @property
    def executables(self) -> dict[tuple[str, tuple[int, int]], jax.stages.Compiled]:
        """The compiled step executables by (kind, (rows, tokens)) (a copy; for inspection)."""
        return dict(self._executables)

    def recompile(self, key: tuple[str, tuple[int, int]], options: dict) -> jax.stages.Compiled:
        """Compile the step ``key`` again with XLA ``options`` in place of its own and serve it from
        now on (for benchmarks: trying other options, dumping what XLA made of a step). Only
        between calls: never while a call is prepared or in flight."""
        self._executables[key] = self.lower(key).compile(compiler_options=options or None)
        self._host_shardings.pop(key, None)
        return self._executables[key]

    def _tp(self) -> int:
        return self.model.mesh.size if self.model.mesh is not None else 1

    def options(self, key: tuple[str, tuple[int, int]]) -> dict:
        """The XLA options the step ``key`` is compiled with (``xla_flags.executable_options``)."""
        return executable_options(key[0], key[1], self._tp(), self.model.p2p_all_reduce, self.env.xla_flags)

    def _unrolled(self, key: tuple[str, tuple[int, int]]) -> bool:
        """Whether this executable runs the layers as straight-line code: a small-batch decode call
        of an engine that sums them with its CUDA kernel (``models/row_parallel.py``). Its layers
        then hold no XLA collective, so XLA can make them one command buffer (CUDA graph) a step;
        inside a layer loop XLA would launch one per layer from the host, updated for the layer's
        weight addresses first, which costs more host time than the device's work at tp=2."""
        return self.model.p2p_all_reduce and is_small_batch_tp_decode(key[0], key[1], self._tp())

    def _describe(self, key: tuple[str, tuple[int, int]], inputs: tuple) -> str:
        """Everything a step executable's lowering depends on besides the environment (its key in the store)."""
        model = self.model
        rope = hashlib.sha256(np.ascontiguousarray(model.inv_freq).tobytes()).hexdigest()
        return repr((key, self.options(key), self.block_size, self.decode_steps, model.spec, rope,
                     True if self._unrolled(key) else model.layer_unroll, model.p2p_all_reduce,
                     describe_inputs((model.params, self.cache_spec, *inputs))))

    def _store(self) -> ExecutableStore | None:
        """The executable store inside JAX's compilation cache directory, for a single-process engine."""
        cache_dir = getattr(jax.config, 'jax_compilation_cache_dir', None)
        if not cache_dir or jax.process_count() > 1:
            return None
        return ExecutableStore(os.path.join(cache_dir, 'lmdeploy_jax_executables'), self._devices(), self.env)

    def _devices(self) -> list:
        """The engine's devices in its executables' order: the mesh's, or the one the params are on."""
        if self.model.mesh is not None:
            return list(self.model.mesh.devices.flat)
        return list(jax.tree.leaves(self.model.params)[0].devices())

    def recover_cache(self) -> bool:
        """After a failed step: if its donated cache is gone, allocate a fresh (empty) one; True if so."""
        try:
            if not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.cache)):
                jax.block_until_ready(self.cache)     # raises if the failed step produced it
                return False
        except Exception:  # noqa: BLE001 - a cache in error is a lost cache
            pass
        self.cache = allocate_cache_state(self.cache_spec)
        return True

    def _row_slots(self, plan_rows: list, num_rows: int, from_device: list[bool] | None = None) -> RowSlots:
        slots = np.full(num_rows, self.row_slots, np.int32)
        slots[:len(plan_rows)] = [seq.slot for seq, _, _ in plan_rows]
        device = np.zeros(num_rows, bool)
        device[:len(plan_rows)] = from_device or False
        return RowSlots(slots, device)

    def _host_prefill_batch(self, plan_rows: list, shape: tuple[int, int]) -> StepBatch:
        """The prefill batch of ``shape`` for plan rows ``(seq, n, _)``: each sequence's next ``n``
        uncached tokens, from its first uncached position."""
        rows = [(seq.tokens[seq.num_cached:seq.num_cached + n], seq.num_cached, seq.blocks) for seq, n, _ in plan_rows]
        return host_step_batch(rows, shape, self.buckets.max_blocks, self.block_size)

    def prepare(self, plan: StepPlan, bitmask: np.ndarray | None = None) -> PreparedCall:
        """The host arrays of a plan's call, read from the sequences' state: on the engine thread,
        which alone changes that state. A chained decode plan (``plan.carry``) marks the rows
        whose input token the call reads on the device (``CacheState.last``), where the call
        before it leaves it. ``bitmask``: a decode call's token bitmask when a row is guided
        (``Scheduler.bitmask``); the call then runs a guided kind, of one step when the plan has
        one (every row guided). A mixed plan (``plan.decode_rows``) runs the mixed twin of its
        prefill shape, its decode rows in the decode segment."""
        if plan.decode_rows:
            return self._prepare_mixed(plan)
        if plan.prefill:
            batch = self._host_prefill_batch(plan.rows, plan.shape)
        else:
            batch = multistep.host_decode_batch([seq for seq, _, _ in plan.rows], plan.shape[0],
                                                self.buckets.max_blocks, self.block_size, plan.carry)
        carry = plan.carry
        sampled = carry.sampled if carry is not None else [0] * len(plan.rows)
        sp = host_sampling_params([(seq.gen_config, seq.seed, seq.num_generated + k)
                                   for (seq, _, _), k in zip(plan.rows, sampled)], plan.shape[0])
        from_device = [src >= 0 for src in carry.source] if carry is not None else None
        kind = 'prefill' if plan.prefill else 'decode' if needs_general(sp) else 'greedy_decode'
        if bitmask is not None:
            kind = ('guided_' + ('decode' if kind == 'decode' else 'greedy_decode') if plan.steps == self.decode_steps
                    else 'guided_step' if kind == 'decode' else 'guided_greedy_step')
            self._ensure_compiled((kind, plan.shape))
        return PreparedCall(self._executables[kind, plan.shape], batch, sp,
                            self._row_slots(plan.rows, plan.shape[0], from_device),
                            self._host_input_shardings((kind, plan.shape)), bitmask)

    def _prepare_mixed(self, plan: StepPlan) -> PreparedCall:
        """The call of a mixed plan: its first ``plan.decode_rows`` rows (one token each) padded to the
        decode segment's ``plan.segment`` rows (the compiled ``mixed_rows``), then its prefill rows
        padded to ``plan.shape``; sampling params and row slots in the step's row order (``MixedBatch``)."""
        decoding, chunks = plan.rows[:plan.decode_rows], plan.rows[plan.decode_rows:]
        decode = multistep.host_decode_batch([seq for seq, _, _ in decoding], plan.segment,
                                             self.buckets.max_blocks, self.block_size)
        prefill = self._host_prefill_batch(chunks, plan.shape)
        segments = ((decoding, plan.segment), (chunks, plan.shape[0]))
        sp = _host_trees_joined([
            host_sampling_params([(seq.gen_config, seq.seed, seq.num_generated) for seq, _, _ in part], n)
            for part, n in segments])
        rows = _host_trees_joined([self._row_slots(part, n) for part, n in segments])
        key = ('mixed', plan.shape)
        return PreparedCall(self._executables[key], MixedBatch(decode, prefill), sp, rows,
                            self._host_input_shardings(key))

    def _ensure_compiled(self, key: tuple[str, tuple[int, int]]) -> None:
        """Load the guided executable ``key`` from the store, or compile (and store) it, once."""
        if key in self._executables:
            return
        store = self._store()
        description = self._describe(key, _abstract(self._example_inputs(key)))
        executable = store.load(description) if store is not None else None
        if executable is None:
            executable, fresh = compile_tracked(self.lower(key), self.options(key))
            if store is not None and fresh:
                store.save(description, executable)
        self._executables[key] = executable

    def _host_input_shardings(self, key: tuple[str, tuple[int, int]]) -> tuple | None:
        """The shardings the executable takes its host inputs (batch, sampling params, rows) in,
        so that they are put there directly (put on one device, the call would copy them from it
        to the others). None across processes: JAX would compare every process's arrays on each put."""
        if jax.process_count() > 1:
            return None
        if key not in self._host_shardings:
            self._host_shardings[key] = self._executables[key].input_shardings[0][2:]
        return self._host_shardings[key]

    def launch(self, call: PreparedCall) -> SampleOutput:
        """Dispatch a prepared call: one step (prefill) or ``decode_steps`` steps (decode); returns
        the device outputs, already on their way to the host. Touches no scheduler state, so it
        may run on another thread while the engine thread takes earlier results."""
        inputs = jax.device_put(call.host_inputs(), call.host_shardings)
        self.cache, out = call.executable(self.model.params, self.cache, *inputs)
        if not call.sp.want_logprobs.any():          # only the tokens cross to the host
            out = SampleOutput(out.token, None, None, None)
        for leaf in jax.tree.leaves(out):
            leaf.copy_to_host_async()
        return out
