"""The model's tokenizer (``transformers.AutoTokenizer``) with LMDeploy's interface, and streaming
detokenization.

Decoding never runs the tokenization-space clean-up (``" ." -> "."``): it is a lossy heuristic that
would make a streamed text differ from the text decoded at once.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass

from .checkpoint.errors import CheckpointError

logger = logging.getLogger('lmdeploy_jax')

_REPLACEMENT = '\ufffd'   # what decoding gives for the bytes of a character that is not complete yet
_MAX_INDEXES = 5          # LMDeploy's cap on the ids a stop word may stand for
# files of which a Hugging Face tokenizer is made (one at least: the tokenizer's config or its vocabulary)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model', 'vocab.json', 'vocab.txt',
                   'spiece.model', '*.tiktoken')


def check_tokenizer_files(model_dir: str) -> None:
    """CheckpointError naming ``model_dir`` when it holds none of ``TOKENIZER_FILES``."""
    if not any(glob.glob(os.path.join(glob.escape(model_dir), name)) for name in TOKENIZER_FILES):
        raise CheckpointError(model_dir, f'has no tokenizer: none of {", ".join(TOKENIZER_FILES)} is there')


@dataclass(frozen=True)
class DetokenizeState:
    """Where streaming detokenization stands in a sequence of ids (vLLM's offsets).

    Text has been emitted for ``ids[:read_offset]``; ``ids[prefix_offset:read_offset]`` is decoded
    again as context, so that a token's text (a leading space, the rest of a UTF-8 character) is
    what it is inside the sequence. ``DetokenizeState()`` streams all the ids;
    ``DetokenizeState.after(n)`` streams what follows ``n`` context ids (a prompt), with them as context.
    """
    prefix_offset: int = 0
    read_offset: int = 0

    @classmethod
    def after(cls, num_context_ids: int, context_window: int = 5) -> 'DetokenizeState':
        return cls(max(0, num_context_ids - context_window), num_context_ids)


class Tokenizer:
    """Tokenizer of the model in ``model_dir`` (a Hugging Face directory)."""

    def __init__(self, model_dir: str, trust_remote_code: bool = False):
        """``trust_remote_code`` lets transformers run a tokenizer class the model repository ships.
        CheckpointError naming ``model_dir`` when it has no tokenizer or transformers cannot load it."""
        from transformers import AutoTokenizer
        check_tokenizer_files(model_dir)
        self.model_dir = model_dir
        try:
            self.hf_tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(model_dir, f'its tokenizer cannot be loaded ({type(e).__name__}: {e})') from e
        self._decoded_vocab: list[str] | None = None
        self._indexes_cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included."""
        return len(self.hf_tokenizer)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf_tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.hf_tokenizer.eos_token_id

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the model ships, or None."""
        return getattr(self.hf_tokenizer, 'chat_template', None) or None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_bos`` adds the tokenizer's special tokens as it is configured to
        (a BOS for Llama-style tokenizers, none for ChatML ones), but never a second BOS in front of a
        text that begins with it, so a rendered chat prompt encodes like ``apply_chat_template``.
        ``add_bos=False`` encodes a text in the middle of a session."""
        ids = self.hf_tokenizer.encode(text, add_special_tokens=add_bos)
        bos, bos_text = self.bos_token_id, self.hf_tokenizer.bos_token
        if (add_bos and bos is not None and bos_text and text.startswith(bos_text)
                and len(ids) >= 2 and ids[0] == ids[1] == bos):
            ids = ids[1:]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        return self.hf_tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)

    def indexes_containing_token(self, word: str) -> list[int]:
        """Ids whose decoded text contains ``word`` (LMDeploy's: how stop and bad words become ids).

        When more than a few ids contain it (a common word), only the last id of its encoding is
        returned, as LMDeploy does.
        """
        if word not in self._indexes_cache:
            if self._decoded_vocab is None:
                self._decoded_vocab = self.hf_tokenizer.batch_decode(
                    [[i] for i in range(self.vocab_size)], skip_special_tokens=False,
                    clean_up_tokenization_spaces=False)
            ids = [i for i, text in enumerate(self._decoded_vocab) if word in text]
            if len(ids) > _MAX_INDEXES:
                last = self.encode(word, add_bos=False)[-1:]
                logger.warning('%d tokens contain %r; using the last token of its encoding, %s',
                               len(ids), word, last)
                ids = last
            self._indexes_cache[word] = ids
        return list(self._indexes_cache[word])

    def detokenize_incrementally(self, all_ids, state: DetokenizeState, skip_special_tokens: bool = True,
                                 flush: bool = False) -> tuple[str, DetokenizeState]:
        """The text that ``all_ids`` adds beyond what ``state`` already emitted, and the new state.

        The deltas of successive calls concatenate to ``decode(all_ids)``; text is held back while
        the last ids end inside a UTF-8 character (byte-level BPE, byte fallback), so a delta never
        holds a U+FFFD for an incomplete character, unless ``flush`` (the sequence has ended) lets
        the held text out as ``decode`` renders it. Byte-fallback ids that form invalid UTF-8 are the
        exception: their U+FFFDs depend on the ids that follow, so the stream may render them apart.
        """
        ids = list(all_ids)
        prefix_text = self.decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens)
        text = self.decode(ids[state.prefix_offset:], skip_special_tokens)
        if len(text) > len(prefix_text) and (flush or not text.endswith(_REPLACEMENT)):
            return text[len(prefix_text):], DetokenizeState(state.read_offset, len(ids))
        return '', state
