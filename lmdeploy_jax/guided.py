"""Guided decoding: a request's ``response_format`` as a token mask on its logits (xgrammar).

A grammar (``messages.response_format_grammar``: a JSON schema or a regex) is compiled once per
distinct grammar and kept in a bounded LRU cache; each guided request gets its own matcher, which
the scheduler advances on the host with every token the request takes. Before a call is
launched, ``Guide.bitmask`` packs the rows' next-token masks into one int32 array [rows,
ceil(vocab / 32)] (bit ``j`` of word ``i``: token ``32 * i + j`` allowed; unguided and padding
rows allow everything). The JAX engine applies it to the logits on the device before sampling
(``engine/sampler.apply_bitmask``); only its calls with a guided row take a bitmask, and they run
executables of their own (``engine/runner.py``), so unguided calls move no extra data. The
reference backend applies it on the host (``allowed_tokens``). Host side only: no JAX here.

JSON grammars allow no free whitespace (compact separators): a small model otherwise may spend its
token budget on blank lines the schema allows. The matcher stops on the request's stop ids (the
tokenizer's EOS when it has none), the only tokens it allows once the grammar is complete.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np

from .engine_api import EngineRequest
from .messages import response_format_grammar

GRAMMAR_CACHE_SIZE = 128      # distinct compiled grammars kept


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one row's bitmask."""
    return -(-vocab_size // 32)


def allowed_tokens(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The bool [vocab_size] mask of one bitmask row (host side, for the reference backend)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask_row, '<i4').view(np.uint8), bitorder='little')
    return bits[:vocab_size].astype(bool)


class GrammarCache:
    """Compiled grammars of one tokenizer, by grammar, least recently used dropped past ``capacity``.
    The tokenizer (``hf_dir``) is read on the first compile, so engines that never guide pay nothing."""

    def __init__(self, hf_dir: str, vocab_size: int, capacity: int = GRAMMAR_CACHE_SIZE):
        self.hf_dir, self.vocab_size, self.capacity = hf_dir, vocab_size, capacity
        self._compiler = None
        self._compiled: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.compiles = 0                      # grammars compiled (cache misses)

    def _grammar_compiler(self):
        if self._compiler is None:
            import xgrammar
            from transformers import AutoTokenizer
            info = xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(self.hf_dir),
                                                           vocab_size=self.vocab_size)
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def get(self, grammar: tuple[str, str]):
        """The ``xgrammar.CompiledGrammar`` of ('json', schema text) or ('regex', pattern);
        ValueError naming ``response_format`` when xgrammar cannot compile it."""
        if grammar in self._compiled:
            self._compiled.move_to_end(grammar)
            return self._compiled[grammar]
        kind, source = grammar
        compiler = self._grammar_compiler()
        try:
            if kind == 'json':
                compiled = compiler.compile_json_schema(json.loads(source), any_whitespace=False)
            else:
                compiled = compiler.compile_regex(source)
        except Exception as exc:  # noqa: BLE001 - xgrammar raises RuntimeError and others on a bad grammar
            what = 'JSON schema' if kind == 'json' else 'regex'
            raise ValueError(f'response_format: xgrammar cannot compile the {what}: {exc}') from None
        self.compiles += 1
        self._compiled[grammar] = compiled
        if len(self._compiled) > self.capacity:
            self._compiled.popitem(last=False)
        return compiled


class Guide:
    """The matchers of the guided requests being served, by request. Used on the engine thread."""

    def __init__(self, grammars: GrammarCache):
        self.grammars = grammars
        self._matchers: dict[int, object] = {}          # id(request) -> xgrammar.GrammarMatcher

    def start(self, request: EngineRequest) -> str | None:
        """Give a guided request its matcher; why it cannot be guided, or None. Unguided: no-op."""
        fmt = request.gen_config.response_format
        grammar = response_format_grammar(fmt) if fmt is not None else None
        if grammar is None:
            return None
        try:
            compiled = self.grammars.get(grammar)
        except ValueError as exc:
            return str(exc)
        import xgrammar
        stop_ids = list(request.gen_config.stop_token_ids or ()) or None
        self._matchers[id(request)] = xgrammar.GrammarMatcher(compiled, override_stop_tokens=stop_ids)
        return None

    def is_guided(self, request: EngineRequest | None) -> bool:
        return id(request) in self._matchers

    def stop(self, request: EngineRequest | None) -> None:
        """Drop the request's matcher (finished, cancelled, failed)."""
        self._matchers.pop(id(request), None)

    def accept(self, request: EngineRequest, token: int) -> str:
        """Advance the request's matcher by ``token``: 'ok', 'terminated' (a stop token ended the
        grammar) or 'rejected' (the token breaks the grammar)."""
        matcher = self._matchers[id(request)]
        if not matcher.accept_token(token):
            return 'rejected'
        return 'terminated' if matcher.is_terminated() else 'ok'

    def bitmask(self, requests: list[EngineRequest], num_rows: int) -> np.ndarray | None:
        """The next-token bitmask of each row [num_rows, words] (int32), or None when no row is
        guided. Rows past ``requests`` (padding) and unguided rows allow every token."""
        if not self._matchers:
            return None
        guided = [(i, self._matchers[id(r)]) for i, r in enumerate(requests) if id(r) in self._matchers]
        if not guided:
            return None
        out = np.full((num_rows, bitmask_words(self.grammars.vocab_size)), -1, np.int32)
        for i, matcher in guided:
            matcher.fill_next_token_bitmask(out, i)
        return out
