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


REASONING_FORMATS = {
    'qwen3': ReasoningFormat('qwen3', starts_in_reasoning=False),
    'deepseek-r1': ReasoningFormat('deepseek-r1', starts_in_reasoning=True),
}
_ALIASES = {'default': 'deepseek-r1', 'qwen-qwq': 'deepseek-r1', 'intern-s1': 'deepseek-r1'}
REASONING_PARSER_NAMES = sorted([*REASONING_FORMATS, *_ALIASES])


def reasoning_format(name: str) -> ReasoningFormat:
    """The format named ``name`` (or an alias); ValueError listing the names otherwise."""
    key = _ALIASES.get(name, name)
    if key not in REASONING_FORMATS:
        raise ValueError(f'unknown reasoning parser {name!r}; choose one of {", ".join(REASONING_PARSER_NAMES)}')
    return REASONING_FORMATS[key]
