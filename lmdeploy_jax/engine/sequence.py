"""One session's host-side state: its token history, the KV blocks holding it, and its request.

The KV of ``tokens[:num_cached]`` is in ``blocks``; a step feeds the next uncached tokens, and a
step that feeds the last of them samples a new token. Prefill, decode and recompute after
preemption are all this one move with different lengths.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..engine_api import EngineRequest, OutputCallback
from .block_manager import chain_hashes


@dataclass(eq=False)
class Sequence:
    session_id: int
    tokens: list[int] = field(default_factory=list)   # prompts + generated tokens, stop tokens included
    num_cached: int = 0                                # tokens whose KV is written in ``blocks``
    blocks: list[int] = field(default_factory=list)   # the KV blocks, in order
    hashes: list[int] = field(default_factory=list)   # prefix hashes of the full blocks of ``tokens``
    num_registered: int = 0                            # leading blocks offered to the prefix cache
    # the request being served (None while the session is idle)
    request: EngineRequest | None = None
    on_output: OutputCallback | None = None
    num_generated: int = 0
    seed: int = 0
    slot: int | None = None                            # its row slot while running (kv_pool.CacheState.last)
    queued: bool = False                               # its request waits for its first admission

    @property
    def pending(self) -> int:
        """Tokens still to feed before the next token can be sampled."""
        return len(self.tokens) - self.num_cached

    @property
    def gen_config(self):
        return self.request.gen_config

    def start(self, request: EngineRequest, on_output: OutputCallback) -> None:
        """Attach a request; ``sequence_start`` must have been handled (``reset``) by the caller."""
        self.tokens.extend(request.input_ids)
        self.request, self.on_output, self.num_generated, self.queued = request, on_output, 0, True
        seed = request.gen_config.random_seed
        self.seed = (secrets.randbits(32) if seed is None else seed) & 0xFFFFFFFF

    def detach(self) -> None:
        self.request = self.on_output = None

    def block_hashes(self, block_size: int) -> list[int]:
        """Prefix hashes of every full block of the history (computed once, extended as it grows)."""
        if len(self.hashes) < len(self.tokens) // block_size:
            self.hashes = chain_hashes(self.tokens, block_size, self.hashes)
        return self.hashes

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        """Extra blocks to hold the KV of the first ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // block_size) - len(self.blocks))
