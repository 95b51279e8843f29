"""User-facing configuration and result types, with LMDeploy's names and defaults.

Every config validates itself in ``__post_init__`` so a bad value fails at the call that made it,
with a ``ValueError`` naming the field and what is allowed. The kinds are strict: an integer field
takes an ``int`` (not a bool or a float), a boolean field takes ``True`` or ``False`` only (not
``0``/``1`` or a string, which would be read by truthiness), a number field takes a finite ``int``
or ``float``. Integers the engine packs into int32 arrays are bounded by ``INT32_MAX``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .text_checks import require_utf8

logger = logging.getLogger('lmdeploy_jax')

FinishReason = Literal['stop', 'length', 'abort', 'error']
_DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
INT32_MAX = 2 ** 31 - 1
MAX_BATCH_SIZE = 2 ** 16       # more rows than any step runs; larger values only allocate per-row state
_SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)   # what a 64-bit seed can hold, signed or not
GREEDY_TEMPERATURE = 1e-5
MAX_SAMPLES = 64               # GenerationConfig.n's bound, as the server's n
KV_QUANT_POLICIES = (0, 8, 4)  # TurbomindEngineConfig.quant_policy: the KV cache's bits, 0 unquantized


def _require(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ValueError(f'{name} must be {allowed}, got {value!r}')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(name: str, value, low: int, high: int = INT32_MAX, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(_is_int(value) and low <= value <= high, name,
             f'an integer in [{low}, {high}]' + (' or None' if optional else ''), value)


def _number_field(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    _require(ok, name, f'a finite number in {"(" if low_open else "["}{low}, {high}]', value)


def _bool_field(name: str, value) -> None:
    _require(isinstance(value, bool), name, 'True or False', value)


def _optional_int_ids(name: str, ids, vocab_size: int | None) -> None:
    if ids is None:
        return
    high = INT32_MAX if vocab_size is None else vocab_size - 1
    what = 'token ids' if vocab_size is None else f'token ids below the vocabulary size {vocab_size}'
    _require(isinstance(ids, (list, tuple)), name, f'a list of {what}', ids)
    for i, token in enumerate(ids):
        _require(_is_int(token) and 0 <= token <= high, f'{name}[{i}]', f'a token id in [0, {high}]', token)


def _optional_words(name: str, words) -> None:
    if words is None:
        return
    _require(isinstance(words, (list, tuple)), name, 'a list of non-empty strings', words)
    for i, word in enumerate(words):
        _require(isinstance(word, str) and word, f'{name}[{i}]', 'a non-empty string', word)
        require_utf8(word, f'{name}[{i}]')


@dataclass
class GenerationConfig:
    """How to generate one request (LMDeploy's ``GenerationConfig``).

    ``do_sample=False`` means greedy decoding whatever the temperature; ``logprobs=N`` returns the
    top-N log-probabilities of every generated position. ``response_format`` (LMDeploy's forms,
    ``response_format_grammar``) constrains the answer to a JSON schema or a regex by guided
    decoding (the turbomind backend). ``n`` answers per prompt (at most
    ``MAX_SAMPLES``), sampled independently: the pipeline runs each as a request of its own, the
    j-th seeded ``random_seed + j`` when a seed is given.

    ``include_stop_str_in_output`` (LMDeploy's): an answer that stopped on a stop word ends with
    it, and one that stopped on a stop token (EOS, ``stop_token_ids``) ends with that token, in
    ``token_ids`` and as its text (special tokens included), as LMDeploy returns them.
    ``spaces_between_special_tokens`` (LMDeploy's) is taken and has no effect, as in LMDeploy with a
    fast tokenizer: LMDeploy puts the spaces only for slow (Python) tokenizers, and transformers 5,
    which loads every tokenizer here, ignores the flag for every kind it builds.

    ``output_logits`` and ``output_last_hidden_state`` (LMDeploy's): ``'all'`` or ``'generation'``
    puts the answer's logits (float32 ``[rows, vocab]``) or final-normed hidden states (float32
    ``[rows, hidden]``) in ``Response.logits`` / ``Response.last_hidden_state``, as numpy arrays.
    Row ``i`` of ``'all'`` is position ``i`` of the prompt followed by the returned ``token_ids``,
    for every position but the last (``input_token_len + len(token_ids) - 1`` rows: row ``i``
    predicts token ``i + 1``); ``'generation'`` keeps the rows that predict the returned tokens
    (``len(token_ids)`` rows), LMDeploy's slicing. They come with answers that finish with
    ``'stop'`` or ``'length'``, computed once the answer is complete (``output_states.py``).

    LMDeploy's other fields are declared so that code written for it runs; those whose effect is
    not implemented (``_NOT_IMPLEMENTED``: ``logits_processors``, ``return_ppl``, ...) raise
    ``ValueError`` saying why unless left at their default.
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
    response_format: dict | None = None
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    # LMDeploy's fields whose effect is not implemented (_NOT_IMPLEMENTED) are refused unless left at
    # their default; output_logits and output_last_hidden_state (among them in LMDeploy's order) work
    logprob_start_len: int = -1
    logits_processors: list | None = None
    output_logits: str | None = None
    output_last_hidden_state: str | None = None
    return_ppl: bool = False
    with_cache: bool = False
    preserve_cache: bool = False
    migration_request: object | None = None
    return_routed_experts: bool = False
    repetition_ngram_size: int = 0
    repetition_ngram_threshold: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad field. ``vocab_size`` (the engines and the
        AsyncEngine know it) also bounds the token ids and ``top_k``.

        Run at construction, and again by the engines on every request they receive, so a
        config changed after it was built is refused alone instead of failing the step that
        packs it beside other requests."""
        _int_field('n', self.n, 1, MAX_SAMPLES)
        _int_field('max_new_tokens', self.max_new_tokens, 0)
        _bool_field('do_sample', self.do_sample)
        _number_field('top_p', self.top_p, 0.0, 1.0)
        _int_field('top_k', self.top_k, 0, INT32_MAX if vocab_size is None else vocab_size)
        _number_field('min_p', self.min_p, 0.0, 1.0)
        _number_field('temperature', self.temperature, 0.0, 2.0)
        _number_field('repetition_penalty', self.repetition_penalty, 0.0, 1e4, low_open=True)
        _bool_field('ignore_eos', self.ignore_eos)
        _int_field('random_seed', self.random_seed, *_SEED_RANGE, optional=True)
        _optional_words('stop_words', self.stop_words)
        _optional_words('bad_words', self.bad_words)
        _optional_int_ids('stop_token_ids', self.stop_token_ids, vocab_size)
        _optional_int_ids('bad_token_ids', self.bad_token_ids, vocab_size)
        _int_field('min_new_tokens', self.min_new_tokens, 0, optional=True)
        _bool_field('skip_special_tokens', self.skip_special_tokens)
        _int_field('logprobs', self.logprobs, 0, 20, optional=True)
        _bool_field('include_stop_str_in_output', self.include_stop_str_in_output)
        _bool_field('spaces_between_special_tokens', self.spaces_between_special_tokens)
        if self.response_format is not None:
            response_format_grammar(self.response_format)
        for name in ('output_logits', 'output_last_hidden_state'):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, str) and value in OUTPUT_STATE_KINDS), name,
                     f'None or one of {OUTPUT_STATE_KINDS}', value)
        for name, why in _NOT_IMPLEMENTED.items():
            default = GenerationConfig.__dataclass_fields__[name].default
            value = getattr(self, name)
            _require(value is default or (type(value) is type(default) and value == default), name,
                     f'{default!r} ({why})', value)

    @property
    def greedy(self) -> bool:
        """Greedy when sampling is off, or when the settings leave one candidate: top_k 1, or a
        temperature under ``GREEDY_TEMPERATURE`` (vLLM's threshold). Such a temperature leaves the
        top logit alone in practice, and the smallest ones overflow float32 when the logits are
        divided by them."""
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def replace(self, **changes) -> 'GenerationConfig':
        return dataclasses.replace(self, **changes)


OUTPUT_STATE_KINDS = ('all', 'generation')    # output_logits / output_last_hidden_state: which rows
RESPONSE_FORMAT_TYPES = ('text', 'json_object', 'json_schema', 'regex_schema')


def response_format_grammar(response_format) -> tuple[str, str] | None:
    """The grammar LMDeploy's ``response_format`` asks for: ('json', a JSON schema as JSON text, its
    properties in their given order, which the answer keeps), ('regex', the pattern), or None for
    ``{'type': 'text'}`` (no constraint). The forms: ``{'type': 'json_object'}`` (any JSON object);
    ``{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}`` (the schema may also
    be given as JSON text); ``{'type': 'regex_schema', 'regex_schema': 'pattern'}``.
    ValueError naming the field and the fault for any other value. Whether the schema or the
    pattern compiles is checked by the engines (``guided.py``)."""
    _require(isinstance(response_format, dict) and response_format.get('type') in RESPONSE_FORMAT_TYPES,
             'response_format', f'a dict whose type is one of {RESPONSE_FORMAT_TYPES}', response_format)
    kind = response_format['type']
    if kind == 'text':
        return None
    if kind == 'json_object':
        return 'json', json.dumps({'type': 'object'})
    if kind == 'regex_schema':
        pattern = response_format.get('regex_schema')
        _require(isinstance(pattern, str) and pattern, "response_format['regex_schema']", 'a non-empty regex',
                 pattern)
        return 'regex', pattern
    spec = response_format.get('json_schema')
    _require(isinstance(spec, dict) and 'schema' in spec, "response_format['json_schema']",
             "a dict with a 'schema' (and a 'name')", spec)
    schema = spec['schema']
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"response_format['json_schema']['schema'] is not valid JSON: {exc}") from None
    _require(isinstance(schema, (dict, bool)), "response_format['json_schema']['schema']",
             'a JSON schema (an object)', schema)
    return 'json', json.dumps(schema)


_NOT_IMPLEMENTED = {
    'logprob_start_len': 'logprobs are returned for generated tokens only, not for the prompt',
    'logits_processors': 'sampling runs on the device inside compiled multi-token steps, where a Python callable '
                         'cannot run per token; bad_words, bad_token_ids, min_p, top_k or response_format '
                         'constrain the choice there',
    'return_ppl': 'use the pipeline\'s get_ppl',
    'with_cache': 'no disaggregated serving (KV migration)',
    'preserve_cache': 'no disaggregated serving (KV migration)',
    'migration_request': 'no disaggregated serving (KV migration)',
    'return_routed_experts': 'the engine does not return the experts its router chose',
    'repetition_ngram_size': 'n-gram repetition blocking is not implemented; use repetition_penalty',
    'repetition_ngram_threshold': 'n-gram repetition blocking is not implemented; use repetition_penalty',
}


def _check_engine_common(cfg) -> None:
    _require(isinstance(cfg.dtype, str) and cfg.dtype in _DTYPES, 'dtype', f'one of {_DTYPES}', cfg.dtype)
    _int_field('tp', cfg.tp, 1)
    _int_field('session_len', cfg.session_len, 1, optional=True)
    _int_field('max_batch_size', cfg.max_batch_size, 1, MAX_BATCH_SIZE, optional=True)
    _number_field('cache_max_entry_count', cfg.cache_max_entry_count, 0.0, 1.0, low_open=True)
    _bool_field('enable_prefix_caching', cfg.enable_prefix_caching)


COMMUNICATORS = ('cuda-ipc', 'nccl')
MODEL_FORMATS = (None, 'hf', 'awq', 'gptq')      # TurbomindEngineConfig.model_format


@dataclass
class TurbomindEngineConfig:
    """Configuration of the JAX engine (``backend='turbomind'``).

    ``cache_max_entry_count`` is the fraction of free device memory, after the weights, given to
    the paged KV cache; ``num_cache_blocks`` (ours) fixes the pool size instead, for tests.
    ``quant_policy`` (LMDeploy's): 0 keeps the KV cache in the model dtype; 8 or 4 stores it as
    int8 or int4 codes with a float32 scale and zero point per token and KV head (asymmetric,
    quantized as written), so the same ``cache_max_entry_count`` holds about 1.9 x or 3.6 x the
    tokens at head_dim 128 in bfloat16.
    ``rope_scaling_factor`` (LMDeploy's): when not 0, the model's rope becomes dynamic NTK scaling
    by that factor above the config's ``max_position_embeddings`` (its base and rotated dims kept),
    for sessions longer than the model was trained on.

    Several hosts (LMDeploy's names): ``nnodes`` processes, one per host, join one JAX runtime
    (``jax.distributed``) whose mesh spans all their devices; ``node_rank`` is this process's index,
    0 on the host of ``dist_init_addr`` ('host:port', reachable from every host; required when
    ``nnodes > 1``); ``devices`` limits this process to some of its host's device ids.

    ``communicator`` (LMDeploy's name): how small tensor-parallel steps sum over the GPUs:
    ``'cuda-ipc'`` (the default here, unlike LMDeploy's ``'nccl'``, since it is the faster one on
    our engine) with the peer-memory ``reduce_add_rms_norm`` kernel where the GPUs allow it, else
    XLA's all-reduce; ``'nccl'`` always with XLA's all-reduce (NCCL on GPUs).

    ``ep`` (LMDeploy's): how a mixture of experts' experts split over the ``tp`` devices
    (``models/layers/moe.py``): 1, tensor parallelism inside each expert (each device holds a
    slice of every expert); equal to ``tp`` (> 1), expert parallelism (each device holds
    ``num_experts / tp`` whole experts and runs only the tokens' choices of those; LMDeploy's
    ``tp=N, ep=N`` spelling). Any other value is refused here; at engine build, ``ep > 1`` is
    refused for a dense model or a number of experts ``ep`` does not divide.

    ``model_format`` (LMDeploy's): the checkpoint's weights, ``'hf'`` (float), ``'awq'`` or
    ``'gptq'`` (4-bit, W4A16); None reads it from config.json's ``quantization_config``. A value
    the checkpoint does not match is refused when the engine is built.

    ``enable_mixed_chunk`` (SGLang's name): a prefill step planned while sequences decode also
    feeds each unguided decoding sequence its next token (``engine/scheduler.py``), so decoding
    goes on while prompts are prefilled; compiles one more executable per prefill shape. Such a
    step runs up to ``max_batch_size`` decode tokens beside the prefill's ``max_prefill_token_num``
    (vLLM and SGLang count them inside their budget; here the prefill shapes are compiled buckets,
    and taking a smaller bucket to make room would halve the prefill a step does).
    """
    dtype: str = 'auto'
    model_format: str | None = None
    tp: int = 1
    ep: int = 1
    communicator: str = 'cuda-ipc'
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    devices: list[int] | None = None
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
    enable_mixed_chunk: bool = False

    def __post_init__(self):
        _check_engine_common(self)
        _bool_field('enable_mixed_chunk', self.enable_mixed_chunk)
        block = self.cache_block_seq_len
        _require(_is_int(block) and 1 <= block <= INT32_MAX and block & (block - 1) == 0,
                 'cache_block_seq_len', 'a power of two', block)
        _require(_is_int(self.quant_policy) and self.quant_policy in KV_QUANT_POLICIES, 'quant_policy',
                 f'one of {KV_QUANT_POLICIES} (0: KV cache unquantized, 8: int8, 4: int4)', self.quant_policy)
        _number_field('rope_scaling_factor', self.rope_scaling_factor, 0.0, 1e6)
        _int_field('max_prefill_token_num', self.max_prefill_token_num, 1)
        _int_field('num_cache_blocks', self.num_cache_blocks, 2, optional=True)
        _require(self.compilation_cache_dir is None or isinstance(self.compilation_cache_dir, (str, os.PathLike)),
                 'compilation_cache_dir', 'a path or None', self.compilation_cache_dir)
        _check_nodes(self)
        _require(self.communicator in COMMUNICATORS, 'communicator', f'one of {COMMUNICATORS}', self.communicator)
        _require(_is_int(self.ep) and self.ep in (1, self.tp), 'ep',
                 f'1 or tp={self.tp} (1: each expert split over the tp devices; tp: each device holding '
                 f'num_experts / tp whole experts)', self.ep)
        _require(self.model_format in MODEL_FORMATS, 'model_format',
                 f"one of {MODEL_FORMATS} (None: read from the checkpoint)", self.model_format)


def _check_nodes(cfg) -> None:
    """The multi-host fields of ``TurbomindEngineConfig``."""
    _int_field('nnodes', cfg.nnodes, 1)
    _int_field('node_rank', cfg.node_rank, 0, cfg.nnodes - 1)
    address = cfg.dist_init_addr
    _require(address is None or (isinstance(address, str) and _is_host_port(address)), 'dist_init_addr',
             "None or 'host:port' (a port in [1, 65535])", address)
    _require(cfg.nnodes == 1 or address is not None, 'dist_init_addr',
             f"'host:port' of node 0 when nnodes > 1 (nnodes={cfg.nnodes})", address)
    if cfg.devices is not None:
        _require(cfg.nnodes > 1, 'devices', 'None in a one-node run (set CUDA_VISIBLE_DEVICES instead) or a '
                 'list of device ids with nnodes > 1', cfg.devices)
        _require(isinstance(cfg.devices, (list, tuple)) and len(cfg.devices) > 0
                 and all(_is_int(d) and d >= 0 for d in cfg.devices) and len(set(cfg.devices)) == len(cfg.devices),
                 'devices', 'a non-empty list of distinct device ids >= 0', cfg.devices)


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(':')
    return bool(host) and not any(c.isspace() for c in host) and port.isdigit() and 1 <= int(port) <= 65535


@dataclass
class PytorchEngineConfig:
    """Configuration of the reference backend (``backend='pytorch'``), the transformers model in torch.
    ``quant_policy`` (LMDeploy's field) must be 0: this backend keeps its KV cache in the model dtype."""
    dtype: str = 'auto'
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    enable_prefix_caching: bool = False
    device_type: str = 'cuda'
    quant_policy: int = 0

    def __post_init__(self):
        _check_engine_common(self)
        _require(isinstance(self.device_type, str) and self.device_type in ('cuda', 'cpu'), 'device_type',
                 "'cuda' or 'cpu'", self.device_type)
        _int_field('block_size', self.block_size, 1)
        _require(_is_int(self.quant_policy) and self.quant_policy == 0, 'quant_policy',
                 '0 on the pytorch backend (KV quantization runs on the turbomind backend)', self.quant_policy)


@dataclass
class Response:
    """One request's result (or, when streaming, one increment of it). ``logits`` and
    ``last_hidden_state``: what ``GenerationConfig.output_logits`` / ``output_last_hidden_state``
    ask for, the whole answer's (float32 numpy ``[rows, vocab]`` / ``[rows, hidden]``), carried by
    the response that finishes it; None otherwise."""
    text: str
    generate_token_len: int
    input_token_len: int
    session_id: int = 0
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
    logits: np.ndarray | None = None
    last_hidden_state: np.ndarray | None = None

    def extend(self, other: 'Response') -> 'Response':
        """Append the next increment ``other`` of the same answer (LMDeploy's): its text, token ids
        and logprobs are added, its counts, ``finish_reason`` and ``index`` taken, and its
        ``logits`` and ``last_hidden_state`` (the whole answer's) when it has them. Returns self."""
        self.text += other.text
        self.generate_token_len, self.input_token_len = other.generate_token_len, other.input_token_len
        self.finish_reason, self.index = other.finish_reason, other.index
        self.token_ids = self.token_ids + list(other.token_ids)
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(other.logprobs)
        if other.logits is not None:
            self.logits = other.logits
        if other.last_hidden_state is not None:
            self.last_hidden_state = other.last_hidden_state
        return self

    def __repr__(self):
        return (f'Response(text={self.text!r}, generate_token_len={self.generate_token_len}, '
                f'input_token_len={self.input_token_len}, finish_reason={self.finish_reason!r})')
