"""How each model family marks its reasoning, by ``--reasoning-parser`` name.

Every format is the ``<think>...</think>`` convention; they differ in where an answer starts:

- ``qwen3`` (Qwen3, QwQ): reasoning only when the answer opens with ``<think>`` (whitespace before
  it allowed), or when the prompt itself ends with ``<think>`` (templates that open the reasoning
  for the model, as Qwen3's thinking-only releases do). Any other answer is all content: Qwen3
  with thinking switched off, or a model that does not reason.
- ``deepseek-r1`` (DeepSeek-R1 and its distillations; LMDeploy's ``default`` and its legacy names
  ``qwen-qwq``, ``intern-s1``): the answer starts in reasoning, with or without its ``<think>``
  (R1's template writes the opening tag into the prompt), so an answer that never closes it is
  all reasoning.

In both, the reasoning ends at the first ``</think>``; everything after it is content, as written
(LMDeploy keeps the whitespace that follows the tag).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...named_formats import NamedFormats

OPEN_TAG, CLOSE_TAG = '<think>', '</think>'


@dataclass(frozen=True)
class ReasoningFormat:
    name: str
    starts_in_reasoning: bool       # an answer without the open tag is reasoning until the close tag
    open_tag: str = OPEN_TAG
    close_tag: str = CLOSE_TAG

    def prompt_opens_reasoning(self, prompt_tail: str) -> bool:
        """Whether a prompt ending in ``prompt_tail`` (its last few tokens' text, special tokens
        kept) leaves the reasoning open for the answer: it ends with the open tag."""
        return prompt_tail.rstrip().endswith(self.open_tag)


_FORMATS = NamedFormats('reasoning parser', {
    'qwen3': ReasoningFormat('qwen3', starts_in_reasoning=False),
    'deepseek-r1': ReasoningFormat('deepseek-r1', starts_in_reasoning=True),
}, aliases={'default': 'deepseek-r1', 'qwen-qwq': 'deepseek-r1', 'intern-s1': 'deepseek-r1'})
REASONING_PARSER_NAMES = _FORMATS.names
reasoning_format = _FORMATS.get       # the format named ``name`` (or an alias); ValueError listing the names
