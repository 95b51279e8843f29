"""User-facing configuration and result types, with LMDeploy's names and defaults.

Every config validates itself in ``__post_init__`` so a bad value fails at the call that made it,
with a ``ValueError`` naming the field and what is allowed.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

logger = logging.getLogger('lmdeploy_jax')

FinishReason = Literal['stop', 'length', 'abort', 'error']
_DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def _require(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f'{name} must be {allowed}, got {value!r}')


def _optional_int_ids(name: str, ids) -> None:
    if ids is not None:
        _require(isinstance(ids, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in ids),
                 name, 'a list of non-negative token ids', ids)


def _optional_words(name: str, words) -> None:
    if words is not None:
        _require(isinstance(words, (list, tuple)) and all(isinstance(w, str) and w for w in words),
                 name, 'a list of non-empty strings', words)


@dataclass
class GenerationConfig:
    """How to generate one request (LMDeploy's ``GenerationConfig``).

    ``do_sample=False`` means greedy decoding whatever the temperature; ``logprobs=N`` returns the
    top-N log-probabilities of every generated position.
    """
    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    min_p: float = 0.0
    temperature: float = 0.8
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_token_ids: list[int] | None = None
    min_new_tokens: int | None = None
    skip_special_tokens: bool = True
    logprobs: int | None = None

    def __post_init__(self):
        _require(isinstance(self.n, int) and self.n >= 1, 'n', 'an integer >= 1', self.n)
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, 'max_new_tokens',
                 'an integer >= 0', self.max_new_tokens)
        _require(isinstance(self.top_p, (int, float)) and 0.0 <= self.top_p <= 1.0, 'top_p', 'in [0, 1]',
                 self.top_p)
        _require(isinstance(self.top_k, int) and self.top_k >= 0, 'top_k', 'an integer >= 0 (0 disables it)',
                 self.top_k)
        _require(isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0, 'min_p', 'in [0, 1]',
                 self.min_p)
        _require(isinstance(self.temperature, (int, float)) and self.temperature >= 0.0, 'temperature',
                 '>= 0', self.temperature)
        _require(isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0.0,
                 'repetition_penalty', '> 0', self.repetition_penalty)
        _require(self.random_seed is None or isinstance(self.random_seed, int), 'random_seed',
                 'an integer or None', self.random_seed)
        _require(self.min_new_tokens is None or (isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0),
                 'min_new_tokens', 'an integer >= 0 or None', self.min_new_tokens)
        _require(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
                 'logprobs', 'an integer in [0, 20] or None', self.logprobs)
        _optional_words('stop_words', self.stop_words)
        _optional_words('bad_words', self.bad_words)
        _optional_int_ids('stop_token_ids', self.stop_token_ids)
        _optional_int_ids('bad_token_ids', self.bad_token_ids)

    @property
    def greedy(self) -> bool:
        """Greedy when sampling is off, or when the settings leave one candidate."""
        return not self.do_sample or self.temperature == 0.0 or self.top_k == 1

    def replace(self, **changes) -> 'GenerationConfig':
        return dataclasses.replace(self, **changes)


def _check_engine_common(cfg) -> None:
    _require(cfg.dtype in _DTYPES, 'dtype', f'one of {_DTYPES}', cfg.dtype)
    _require(isinstance(cfg.tp, int) and cfg.tp >= 1, 'tp', 'an integer >= 1', cfg.tp)
    _require(cfg.session_len is None or (isinstance(cfg.session_len, int) and cfg.session_len >= 1),
             'session_len', 'an integer >= 1 or None', cfg.session_len)
    _require(cfg.max_batch_size is None or (isinstance(cfg.max_batch_size, int) and cfg.max_batch_size >= 1),
             'max_batch_size', 'an integer >= 1 or None', cfg.max_batch_size)
    _require(isinstance(cfg.cache_max_entry_count, (int, float)) and 0.0 < cfg.cache_max_entry_count <= 1.0,
             'cache_max_entry_count', 'in (0, 1]', cfg.cache_max_entry_count)


@dataclass
class TurbomindEngineConfig:
    """Configuration of the JAX engine (``backend='turbomind'``).

    ``cache_max_entry_count`` is the fraction of free device memory, after the weights, given to
    the paged KV cache; ``num_cache_blocks`` (ours) fixes the pool size instead, for tests.
    ``rope_scaling_factor`` (LMDeploy's): when not 0, the model's rope becomes dynamic NTK scaling
    by that factor above the config's ``max_position_embeddings`` (its base and rotated dims kept),
    for sessions longer than the model was trained on.
    """
    dtype: str = 'auto'
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    cache_block_seq_len: int = 64
    enable_prefix_caching: bool = False
    quant_policy: int = 0
    rope_scaling_factor: float = 0.0
    max_prefill_token_num: int = 8192
    num_cache_blocks: int | None = None
    compilation_cache_dir: str | None = None

    def __post_init__(self):
        _check_engine_common(self)
        _require(isinstance(self.cache_block_seq_len, int) and self.cache_block_seq_len >= 1
                 and self.cache_block_seq_len & (self.cache_block_seq_len - 1) == 0,
                 'cache_block_seq_len', 'a power of two', self.cache_block_seq_len)
        _require(self.quant_policy in (0,), 'quant_policy', '0 (KV quantization is not supported yet)',
                 self.quant_policy)
        _require(isinstance(self.rope_scaling_factor, (int, float)) and not isinstance(self.rope_scaling_factor, bool)
                 and 0.0 <= self.rope_scaling_factor <= 1e6, 'rope_scaling_factor', 'a finite number in [0.0, 1000000.0]',
                 self.rope_scaling_factor)
        _require(isinstance(self.max_prefill_token_num, int) and self.max_prefill_token_num >= 1,
                 'max_prefill_token_num', 'an integer >= 1', self.max_prefill_token_num)
        blocks = self.num_cache_blocks
        _require(blocks is None or (isinstance(blocks, int) and blocks >= 2),
                 'num_cache_blocks', 'an integer >= 2 or None', self.num_cache_blocks)


@dataclass
class PytorchEngineConfig:
    """Configuration of the reference backend (``backend='pytorch'``), the transformers model in torch."""
    dtype: str = 'auto'
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    enable_prefix_caching: bool = False
    device_type: str = 'cuda'

    def __post_init__(self):
        _check_engine_common(self)
        _require(self.device_type in ('cuda', 'cpu'), 'device_type', "'cuda' or 'cpu'", self.device_type)
        _require(isinstance(self.block_size, int) and self.block_size >= 1, 'block_size', 'an integer >= 1',
                 self.block_size)


@dataclass
class Response:
    """One request's result (or, when streaming, one increment of it)."""
    text: str
    generate_token_len: int
    input_token_len: int
    session_id: int = 0
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0

    def __repr__(self):
        return (f'Response(text={self.text!r}, generate_token_len={self.generate_token_len}, '
                f'input_token_len={self.input_token_len}, finish_reason={self.finish_reason!r})')
