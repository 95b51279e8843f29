"""Continuous batching over the paged KV pool: which sequences feed which tokens in the next step.

Requests join between steps. A step is either a prefill step (sequences with more than one token
to feed, chunked under the prefill token budget) or a decode call (every sequence with one token
to feed, run for ``decode_steps`` steps on the device, blocks reserved for all of them). Prefill
goes first, so the batch fills before decoding, but at most ``PREFILL_STREAK`` prefill steps run
in a row while sequences wait to decode.
With mixed steps on (``TurbomindEngineConfig.enable_mixed_chunk``), a prefill step planned while
sequences decode is a mixed step: every unguided decoding sequence feeds its one pending token in
the step's decode segment (blocks for it first, as a decode call's), beside the prompt chunks, so
decoding goes on while prompts are prefilled. ``PREFILL_STREAK`` still counts mixed steps as
prefill steps: a decode call (``decode_steps`` tokens a row, guided rows included) follows as
often as without them, so the tokens the mixed steps add never replace a decode call's. No
prefill step is chained behind a call while an unguided sequence decodes after it (``chain``): a
mixed step planned with the call's results carries it instead.
When blocks run out, idle sessions' KV goes first, then the newest running sequences are
preempted: their blocks are released and their tokens recomputed later, never dropped. With
prefix caching, a sequence starting without KV reuses the registered blocks of its longest cached
prefix, and each block it fills is offered to the cache.

Guided requests (``lmdeploy_jax/guided.py``) sample every token under a mask their matcher computes on the host
from the tokens before it, so such a row takes one token per decode call (its later steps in the
call are dropped, as for a row that finishes mid-call), is left out of the call chained behind
one it is in (its mask needs that call's token), and its prefill stops one token short of the
prompt's end, so that even its first token is sampled by a decode call under its mask.

The scheduler also owns the request lifecycle (the ``InferenceEngine`` session semantics): it
checks and queues requests, turns sampled tokens into outputs, and finishes requests. It runs on
the engine thread only.
"""
from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from ..engine_api import EngineOutput, EngineRequest, OutputCallback, QueueTimes, request_refusal
from ..engine_thread import emit
from ..guided import Guide
from ..messages import FinishReason
from .block_manager import BlockManager
from .buckets import Buckets
from .sampler import SampleOutput, id_list_error, logprob_dict
from .sequence import Sequence

logger = logging.getLogger('lmdeploy_jax')

PREFILL_STREAK = 4      # most consecutive prefill steps while other sequences wait to decode


@dataclass
class Carry:
    """How a decode call chained behind the call in flight continues from it, per row: the row of
    the call in flight whose last sampled token it feeds (-1: the host has its token already), and
    how many tokens that call adds to the row's cache and samples for it."""
    source: list[int]
    cached: list[int]
    sampled: list[int]


@dataclass
class StepPlan:
    """One step's rows: each sequence, how many of its uncached tokens it feeds, and the request served."""
    prefill: bool                                          # a prefill step ([B, T]) or a decode call ([B, 1])
    rows: list[tuple[Sequence, int, EngineRequest]]        # (sequence, tokens it may feed, request at planning)
    shape: tuple[int, int]                                 # the compiled (B, T) it is padded to
    steps: int = 1                                         # device steps of the call (decode: decode_steps)
    carry: Carry | None = None                             # a chained call: what the call in flight adds
    decode_rows: int = 0                                   # a mixed step: its first rows each feed one
    segment: int = 0                                       # token, in a decode segment of this many rows

    def output_row(self, i: int) -> int:
        """Where row ``i``'s results are in the call's outputs: a mixed step's prefill rows follow
        its whole decode segment."""
        return i if i < self.decode_rows else self.segment + i - self.decode_rows


class Scheduler:
    def __init__(self, blocks: BlockManager, buckets: Buckets, session_len: int, max_batch_size: int,
                 vocab_size: int, decode_steps: int = 1, guide: Guide | None = None, mixed: bool = False):
        """``guide``: the engine's guided decoding (None: requests with a ``response_format`` are refused).
        ``mixed``: plan mixed steps (the runner has compiled them)."""
        self.blocks = blocks
        self.guide = guide
        self.queue_times = QueueTimes()
        self.buckets = buckets
        self.session_len = session_len
        self.max_batch_size = max_batch_size
        self.vocab_size = vocab_size
        self.sessions: dict[int, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []                  # oldest admitted first
        self._free_slots = list(range(max_batch_size))[::-1]   # row slots (Sequence.slot), lowest popped first
        self.idle: OrderedDict[int, Sequence] = OrderedDict()  # sessions keeping KV between requests, LRU first
        self.decode_steps = decode_steps
        self._prefill_streak = 0                           # prefill steps since the last decode call
        self.num_preemptions = 0
        self.prefilled_tokens = 0                          # tokens fed by prefill steps (recompute included)
        self.mixed = mixed
        self.mixed_steps = 0                               # mixed steps planned

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- requests and sessions ----

    def submit(self, request: EngineRequest, on_output: OutputCallback) -> None:
        error = self._refusal(request) or self._start_guide(request)
        if error is not None:
            emit(on_output, EngineOutput([], finish_reason='error', error=error))
            return
        seq = self.sessions.get(request.session_id)
        if seq is None:
            seq = self.sessions[request.session_id] = Sequence(request.session_id)
        elif request.sequence_start:
            self._drop_kv(seq)
            seq.tokens, seq.hashes = [], []
        self.idle.pop(seq.session_id, None)
        seq.start(request, on_output)
        if request.gen_config.max_new_tokens == 0 or len(seq.tokens) >= self.session_len:
            self._finish(seq, 'length')
        else:
            self.waiting.append(seq)

    def _refusal(self, request: EngineRequest) -> str | None:
        """Why a request cannot run, or None; a refused request leaves its session as it was.
        Its generation config is validated again here (``request_refusal``), so settings that
        could not be packed beside other rows (``host_sampling_params``) are refused alone."""
        seq = self.sessions.get(request.session_id)
        held = 0 if seq is None or request.sequence_start else len(seq.tokens)
        return (request_refusal(request, vocab_size=self.vocab_size, session_len=self.session_len,
                                busy=seq is not None and seq.request is not None, held=held)
                or id_list_error(request.gen_config))

    def _start_guide(self, request: EngineRequest) -> str | None:
        """Give a guided request its matcher; why it cannot run, or None."""
        if self.guide is not None:
            return self.guide.start(request)
        if request.gen_config.response_format not in (None, {'type': 'text'}):
            return 'response_format: this engine has no guided decoding'
        return None

    def _guided(self, seq: Sequence) -> bool:
        return self.guide is not None and self.guide.is_guided(seq.request)

    def bitmask(self, plan: StepPlan) -> np.ndarray | None:
        """The token bitmask of a decode call with a guided row (``Guide.bitmask``), or None."""
        if self.guide is None or plan.prefill:
            return None
        return self.guide.bitmask([request for _, _, request in plan.rows], plan.shape[0])

    def cancel(self, session_id: int) -> None:
        seq = self.sessions.get(session_id)
        if seq is not None and seq.request is not None:
            self._finish(seq, 'abort')

    def end_session(self, session_id: int) -> None:
        self.cancel(session_id)
        seq = self.sessions.pop(session_id, None)
        if seq is not None:
            self.idle.pop(session_id, None)
            self._drop_kv(seq)

    def abort_all(self) -> None:
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, 'abort')
        for session_id in list(self.sessions):
            self.end_session(session_id)

    def fail(self, plan: StepPlan, error: str) -> None:
        """A step failed: finish its requests with 'error' (their sessions are forgotten)."""
        for seq, _, request in plan.rows:
            if seq.request is request:
                self._finish(seq, 'error', error=error)

    def _finish(self, seq: Sequence, reason: FinishReason, token_ids: list[int] | None = None,
                logprobs: list | None = None, error: str | None = None) -> None:
        """End the sequence's request: free its slot (and its session when it ends), then report."""
        if seq in self.running:
            self._stop_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        on_output, request = seq.on_output, seq.request
        if self.guide is not None:
            self.guide.stop(request)
        seq.detach()
        if request.sequence_end or reason == 'error':
            if self.sessions.get(seq.session_id) is seq:
                del self.sessions[seq.session_id]
            self._drop_kv(seq)
        else:
            self.idle[seq.session_id] = seq
        emit(on_output, EngineOutput(token_ids or [], logprobs, reason, error))

    def forget_all_kv(self) -> None:
        """The device cache was lost: every sequence recomputes from its tokens, nothing is cached."""
        for seq in list(self.running):
            self._preempt(seq)
        for seq in self.sessions.values():
            self._drop_kv(seq)
        self.blocks.forget_cached()

    # ---- blocks ----

    def _drop_kv(self, seq: Sequence) -> None:
        """Release the sequence's blocks; its tokens stay, to be recomputed if it runs again."""
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_cached, seq.num_registered = [], 0, 0

    def _free_idle(self, needed: int) -> bool:
        """Drop idle sessions' KV (least recently used first) until ``needed`` blocks are free."""
        while self.blocks.num_free() < needed and self.idle:
            _, seq = self.idle.popitem(last=False)
            self._drop_kv(seq)
        return self.blocks.num_free() >= needed

    def _start_running(self, seq: Sequence) -> None:
        seq.slot = self._free_slots.pop()
        self.running.append(seq)
        if seq.queued:     # its first admission (a preempted sequence comes back later)
            seq.queued = False
            self.queue_times.started(seq.request)

    def _stop_running(self, seq: Sequence) -> None:
        """Out of the batch; its row slot is free for the next sequence admitted. (A call still
        in flight may write its slot; device order puts the next owner's first write after it.)"""
        self.running.remove(seq)
        self._free_slots.append(seq.slot)
        seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._stop_running(seq)
        self._drop_kv(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _grant(self, seq: Sequence, chunk: int) -> int:
        """Allocate blocks for ``chunk`` more tokens of ``seq``; shrinks the chunk to what is free."""
        bs = self.block_size
        if not self._free_idle(seq.blocks_needed(seq.num_cached + chunk, bs)):
            chunk = min(chunk, (len(seq.blocks) + self.blocks.num_free()) * bs - seq.num_cached)
        if chunk > 0:
            seq.blocks += self.blocks.allocate(seq.blocks_needed(seq.num_cached + chunk, bs))
        return max(chunk, 0)

    def release(self, blocks: list[int]) -> None:
        self.blocks.release(blocks)

    def reserve(self, num_blocks: int) -> list[int]:
        """Blocks for work outside the batch (``get_ppl``): idle KV goes first, then the newest runners."""
        while not self._free_idle(num_blocks) and self.running:
            self._preempt(self.running[-1])
        if self.blocks.num_free() < num_blocks:
            raise MemoryError(f'needs {num_blocks} KV blocks, the pool has {self.blocks.num_blocks - 1}')
        return self.blocks.allocate(num_blocks)

    # ---- planning ----

    def _admit(self) -> None:
        """Move waiting sequences to running while there is a slot and room for their whole prompt."""
        bs = self.block_size
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            matched_now = seq.num_cached == 0 and not seq.blocks
            if matched_now:
                usable = (len(seq.tokens) - 1) // bs     # keep one token to feed, to sample from
                seq.blocks = self.blocks.match(seq.block_hashes(bs)[:usable])
                seq.num_cached, seq.num_registered = len(seq.blocks) * bs, len(seq.blocks)
            # room for the rest of the prompt plus one block of growth per running sequence
            needed = seq.blocks_needed(len(seq.tokens) + 1, bs) + len(self.running)
            if self.running and not self._free_idle(needed):
                if matched_now:     # a waiting sequence must not pin cached blocks the runners need
                    self._drop_kv(seq)
                break
            self._start_running(self.waiting.popleft())

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when nothing can run."""
        while True:
            self._admit()
            if not self.running:
                return None
            prefill = [s for s in self.running if s.pending > 1]
            decode = [s for s in self.running if s.pending == 1]
            if prefill and (not decode or self._prefill_streak < PREFILL_STREAK):
                plan = self._plan_prefill(prefill, [s for s in decode if not self._guided(s)] if self.mixed else [])
            else:
                plan = self._plan_decode(decode)
            if plan is not None:
                self._prefill_streak = self._prefill_streak + 1 if plan.prefill else 0
                self.mixed_steps += plan.decode_rows > 0
                return plan
            # nothing could get a block: make room from the newest, or fail a lone oversized sequence
            # (planning may itself have preempted every runner: then admit again)
            if len(self.running) > 1:
                self._preempt(self.running[-1])
            elif self.running:
                seq = self.running[0]
                self._finish(seq, 'error', error=f'the KV cache ({self.blocks.num_blocks - 1} blocks of '
                             f'{self.block_size}) cannot hold this sequence of {len(seq.tokens)} tokens')

    def _plan_prefill(self, candidates: list[Sequence], riders: list[Sequence] = ()) -> StepPlan | None:
        """Prompt chunks of ``candidates`` within the prefill buckets; with ``riders`` (decoding
        sequences), a mixed step: they come first, each with a block for its one token (which
        may preempt the newest running sequences, riders or prompts). When no chunk gets a block,
        the riders' decode call (``_plan_decode``); None when there are none either."""
        decoding = [(seq, 1, seq.request) for seq in self._reserve_next(riders)]
        rows, chunks = [], []
        for seq in candidates:
            if seq.slot is None:
                continue                                   # preempted for a rider's block
            chunk = min(seq.pending - self._guided(seq), self.buckets.max_chunk)
            if rows and self.buckets.prefill_shape(chunks + [chunk]) is None:
                chunk = min(chunk, self.buckets.prefill_shape(chunks)[1])
                if self.buckets.prefill_shape(chunks + [chunk]) is None:
                    break
            chunk = self._grant(seq, chunk)
            if chunk > 0:
                rows.append((seq, chunk, seq.request))
                chunks.append(chunk)
        if not rows:     # the riders' blocks may have preempted every prompt: they still decode
            return self._plan_decode([seq for seq, _, _ in decoding]) if decoding else None
        return StepPlan(True, decoding + rows, self.buckets.prefill_shape(chunks), decode_rows=len(decoding),
                        segment=self.buckets.max_batch if decoding else 0)

    def _reserve_next(self, candidates: list[Sequence]) -> list[Sequence]:
        """Give every candidate a block for its next token where its last block is full (the newest
        running sequences are preempted while none is free); returns the candidates still running."""
        bs = self.block_size
        alive = set(self.running)                          # a set: membership per row must not cost O(B)
        for seq in candidates:
            if seq.blocks_needed(seq.num_cached + 1, bs) == 0:
                continue                                   # the usual case: its last block has room
            while seq in alive and not self._free_idle(1):
                alive.discard(self.running[-1])
                self._preempt(self.running[-1])
            if seq in alive:
                seq.blocks += self.blocks.allocate(1)
        return [seq for seq in candidates if seq in alive]

    def _plan_decode(self, candidates: list[Sequence]) -> StepPlan | None:
        """Every decoding sequence gets a block for its next token (the newest are preempted if
        none is free), then, from what is left, blocks for the rest of the call's steps it can use."""
        bs = self.block_size
        rows = []
        for seq in self._reserve_next(candidates):
            gen = seq.gen_config
            steps = 1 if self._guided(seq) else self.decode_steps
            useful = min(steps, gen.max_new_tokens - seq.num_generated, self.session_len - len(seq.tokens))
            if useful > 1 and seq.blocks_needed(seq.num_cached + useful, bs) > 0:
                useful = max(1, self._grant(seq, useful))
            rows.append((seq, useful, seq.request))
        if not rows:
            return None
        return StepPlan(False, rows, (self.buckets.decode_shape(len(rows)), 1), self._call_steps(rows))

    def _call_steps(self, rows: list) -> int:
        """Device steps of a decode call: one when every row is guided (each takes one token a call)."""
        return 1 if all(self._guided(seq) for seq, _, _ in rows) else self.decode_steps

    def chain(self, plan: StepPlan) -> StepPlan | None:
        """The call to dispatch right behind ``plan`` (still in flight), planned before its results
        reach the host; or None when the host must see them first.

        Prompts come first, as in ``schedule``: while a waiting prompt can take a free slot (or
        an admitted one still has prompt to feed), the chained call is a prefill step for the
        sequences outside ``plan`` (``plan``'s own rows change when its results are taken),
        within ``PREFILL_STREAK``; with mixed steps on, only while no unguided sequence decodes
        after ``plan`` (a mixed step planned with ``plan``'s results carries it and the prompts).
        Otherwise it is a decode call (``_chain_decode``)."""
        if self.waiting and len(self.running) < self.max_batch_size:
            self._admit()
        in_plan = {id(seq): fed for seq, fed, _ in plan.rows}
        prompts = [s for s in self.running if s.pending > 1 and id(s) not in in_plan]
        decoding = any(s.pending == 1 or id(s) in in_plan for s in self.running)
        if prompts and self.mixed and any(self._decodes_after(s, plan, in_plan) for s in self.running):
            prompts = []
        if prompts and (not decoding or self._prefill_streak < PREFILL_STREAK):
            chained = self._plan_prefill(prompts)
            if chained is not None:
                self._prefill_streak += 1
            return chained
        return self._chain_decode(plan)

    def _decodes_after(self, seq: Sequence, plan: StepPlan, in_plan: dict[int, int]) -> bool:
        """Whether unguided ``seq`` feeds one token a step once ``plan`` (in flight; ``in_plan``: its
        rows' fed tokens by ``id``) is done: it decodes now, or ``plan`` decodes it or ends its prompt."""
        if self._guided(seq):
            return False
        fed = in_plan.get(id(seq))
        if fed is None:
            return seq.pending == 1
        return not plan.prefill or fed == seq.pending

    def _chain_decode(self, plan: StepPlan) -> StepPlan | None:
        """The decode call behind ``plan``, each row fed by ``plan``'s last sampled token for it on
        the device (``Carry``); or None: a running row still has prompt to feed after ``plan``,
        or the blocks for the call's positions are not free.

        Behind a decode call the rows are its rows; behind a prefill step, the rows whose prompt
        it completes start decoding from the token it samples, and the others continue from
        tokens the host has. A row that reaches its length limit inside ``plan`` is left out (its
        slot frees when ``plan``'s results are taken); one that reaches it inside the chained call
        feeds only its remaining tokens. Rows that stop (a stop token) inside ``plan`` waste the
        chained call's work for them; their results are dropped, and their KV writes land in
        their own blocks past their end (``multistep.py``), which device order keeps ahead of any
        later owner's writes."""
        in_flight = {id(seq): (i, fed, request) for i, (seq, fed, request) in enumerate(plan.rows)}
        steps, bs = self.decode_steps, self.block_size
        rows, carry = [], Carry([], [], [])
        for seq in self.running:
            i, fed, request = in_flight.get(id(seq), (-1, 0, seq.request))
            guided = self._guided(seq)
            if 0 <= i and (guided or not plan.prefill and fed < steps and self._reaches_limit(seq, fed)):
                continue                                   # it ends inside ``plan``, or its mask needs its token
            if i < 0:
                cached = sampled = 0                       # not in ``plan``: decoding already
                ready = seq.pending == 1
            elif plan.prefill:
                cached, sampled = fed, 1                   # its prompt ends here; one token sampled
                ready = fed == seq.pending
            else:
                cached = sampled = steps
                ready = fed == steps and seq.pending == 1
            if not ready or seq.request is not request:
                return None
            left = min(request.gen_config.max_new_tokens - seq.num_generated,
                       self.session_len - len(seq.tokens)) - sampled
            if left > 0:
                rows.append((seq, min(1 if guided else steps, left), request))
                carry.source.append(i)
                carry.cached.append(cached)
                carry.sampled.append(sampled)
        if not rows:
            return None
        needed = [seq.blocks_needed(seq.num_cached + cached + n, bs)
                  for (seq, n, _), cached in zip(rows, carry.cached)]
        if sum(needed) > self.blocks.num_free():
            return None
        for (seq, _, _), n in zip(rows, needed):
            if n:
                seq.blocks += self.blocks.allocate(n)
        self._prefill_streak = 0
        return StepPlan(False, rows, (self.buckets.decode_shape(len(rows)), 1), self._call_steps(rows), carry)

    def _reaches_limit(self, seq: Sequence, tokens: int) -> bool:
        """Whether ``tokens`` more generated tokens take ``seq`` to its length limit."""
        return (seq.num_generated + tokens >= seq.gen_config.max_new_tokens
                or len(seq.tokens) + tokens >= self.session_len)

    # ---- results ----

    def complete(self, plan: StepPlan, out: SampleOutput) -> None:
        """Take a call's host-side results (decode: [steps, B] arrays): advance each row, report its
        tokens or finish it."""
        tokens = out.token.tolist()
        for i, (seq, fed, request) in enumerate(plan.rows):
            if seq.request is not request:
                continue                                   # cancelled or failed while the step ran
            if plan.prefill:                               # a mixed step's decoding rows too: fed 1
                seq.num_cached += fed
                self.prefilled_tokens += fed if i >= plan.decode_rows else 0
                if seq.pending == 0:
                    row = plan.output_row(i)
                    self._take_tokens(seq, [tokens[row]], out, row, None)
            else:
                self._take_tokens(seq, [step[i] for step in tokens[:fed]], out, i, 0)
            self._register_blocks(seq)

    def _register_blocks(self, seq: Sequence) -> None:
        if self.blocks.enable_prefix_caching:
            bs = self.block_size
            hashes = seq.block_hashes(bs)
            for j in range(seq.num_registered, seq.num_cached // bs):
                self.blocks.register(seq.blocks[j], hashes[j])
            seq.num_registered = max(seq.num_registered, seq.num_cached // bs)

    def _take_tokens(self, seq: Sequence, sampled: list[int], out: SampleOutput, row: int,
                     first_step: int | None) -> None:
        """Append a row's sampled tokens up to its finish; report them in one output.

        ``first_step`` is None for a prefill step (the token was sampled after the chunk, which the
        caller has counted as cached) and 0 for a decode call, where each token was sampled after
        feeding the previous one: each counts one more cached token."""
        gen = seq.gen_config
        stop_ids = gen.stop_token_ids or ()
        reported, logprobs = [], None if gen.logprobs is None else []
        for k, token in enumerate(sampled):
            if first_step is not None:
                seq.num_cached += 1
            seq.tokens.append(token)
            seq.num_generated += 1
            if token in stop_ids:
                if gen.include_stop_str_in_output:    # LMDeploy's: the stop token ends the reported answer
                    reported.append(token)
                    if logprobs is not None:
                        logprobs.append(logprob_dict(out, row, gen.logprobs, None if first_step is None else k))
                self._finish(seq, 'stop', reported, logprobs)
                return
            if self._guided(seq):
                verdict = self.guide.accept(seq.request, token)
                if verdict != 'ok':
                    self._finish(seq, 'stop' if verdict == 'terminated' else 'error', reported, logprobs,
                                 None if verdict == 'terminated' else f'token {token} breaks the response_format')
                    return
            reported.append(token)
            if logprobs is not None:
                logprobs.append(logprob_dict(out, row, gen.logprobs, None if first_step is None else k))
            if seq.num_generated >= gen.max_new_tokens or len(seq.tokens) >= self.session_len:
                self._finish(seq, 'length', reported, logprobs)
                return
        if not emit(seq.on_output, EngineOutput(reported, logprobs)):
            self._finish(seq, 'error', error='the output callback failed')

