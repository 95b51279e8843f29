"""Chat templates: turn a prompt or an OpenAI-style message list into the text a model was tuned on.

Which template a model's prompts are rendered with (``get_chat_template``), chosen by a
``ChatTemplateConfig`` (LMDeploy's) or from the model: its own Jinja template
(``chat_template_hf.HFChatTemplate``), else a builtin matched from the model path
(``chat_template_builtins``), else ``base``. The templates' classes are importable from here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass

from .chat_template_builtins import BUILTINS, BaseChatTemplate, match_template_name
from .chat_template_hf import HF_TEMPLATE_NAME, HFChatTemplate

__all__ = ['BaseChatTemplate', 'ChatTemplateConfig', 'HFChatTemplate', 'get_chat_template', 'list_templates',
           'match_template_name']

logger = logging.getLogger('lmdeploy_jax')

_CAPABILITIES = ('completion', 'infilling', 'chat', 'python')


@dataclass
class ChatTemplateConfig:
    """Which chat template to use, and which of its strings to override (LMDeploy's fields).

    ``model_name`` names a builtin (see ``list_templates()``), ``'hf'`` for the model's own template,
    or a new name; a new name must set at least one field, and the unset ones are empty.
    """
    model_name: str
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    separator: str | None = None
    capability: str | None = None
    stop_words: list[str] | None = None

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError(f'model_name must be a non-empty string, got {self.model_name!r}')
        if self.capability is not None and self.capability not in _CAPABILITIES:
            raise ValueError(f'capability must be one of {_CAPABILITIES}, got {self.capability!r}')
        if self.stop_words is not None and not (
                isinstance(self.stop_words, (list, tuple)) and all(isinstance(w, str) and w for w in self.stop_words)):
            raise ValueError(f'stop_words must be a list of non-empty strings, got {self.stop_words!r}')
        if self.model_name == HF_TEMPLATE_NAME:
            if self.overrides():
                raise ValueError(f"the '{HF_TEMPLATE_NAME}' template renders the model's own chat template and "
                                 f'takes no field overrides, got {sorted(self.overrides())}')
        elif self.model_name not in BUILTINS.names and not self.overrides():
            raise ValueError(f'unknown chat template {self.model_name!r}: not a builtin and no field is set. '
                             f'Builtin templates: {", ".join(list_templates())}')

    def overrides(self) -> dict:
        """The fields that were set, which replace the builtin's strings."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != 'model_name'}

    def to_json(self, file_path: str | None = None) -> str:
        """The config as a JSON string, also written to ``file_path`` when given."""
        text = json.dumps(dataclasses.asdict(self), ensure_ascii=False, indent=4)
        if file_path:
            with open(file_path, 'w', encoding='utf-8') as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, file_or_string: str) -> 'ChatTemplateConfig':
        """A config from a JSON file path or a JSON string (a missing model_name gets a fresh one)."""
        if os.path.isfile(file_or_string):
            with open(file_or_string, encoding='utf-8') as f:
                file_or_string = f.read()
        try:
            data = json.loads(file_or_string)
        except json.JSONDecodeError as e:
            raise ValueError(f'chat template config is neither a file nor valid JSON: {e}') from None
        if not isinstance(data, dict):
            raise ValueError(f'chat template config JSON must be an object, got {type(data).__name__}')
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f'unknown chat template config fields: {sorted(unknown)}')
        if data.get('model_name') is None:
            data['model_name'] = uuid.uuid4().hex
        return cls(**data)

    @property
    def chat_template(self) -> 'BaseChatTemplate':
        """The builtin named by ``model_name`` with the set fields overriding it."""
        if self.model_name == HF_TEMPLATE_NAME:
            raise ValueError(f"the '{HF_TEMPLATE_NAME}' template needs the model's tokenizer: "
                             'use get_chat_template(config, model_path, tokenizer)')
        if self.model_name not in BUILTINS.names:
            logger.info('chat template %r is not a builtin: using the given fields alone', self.model_name)
            return BaseChatTemplate(name=self.model_name, **self.overrides())
        name = BUILTINS.canonical(self.model_name)
        spec = BUILTINS.formats[name]
        return spec.cls(name=name, **{**spec.fields, **self.overrides()})


def list_templates() -> list[str]:
    """Every name a ChatTemplateConfig may give: the builtins, their aliases and 'hf'."""
    return sorted([*BUILTINS.names, HF_TEMPLATE_NAME])


def get_chat_template(chat_template_config: ChatTemplateConfig | None = None, model_path: str | None = None,
                      tokenizer=None):
    """The template a model's prompts are rendered with.

    A config gives its builtin with its fields overriding it ('hf': the model's own template). With
    no config: the model's own template when its tokenizer ships one, else the builtin matched from
    ``model_path``, else ``base``. ``tokenizer`` is a ``lmdeploy_jax.Tokenizer`` or a HF tokenizer.
    """
    hf = getattr(tokenizer, 'hf_tokenizer', tokenizer)
    if chat_template_config is not None:
        if chat_template_config.model_name == HF_TEMPLATE_NAME:
            if hf is None:
                raise ValueError(f"the '{HF_TEMPLATE_NAME}' chat template needs the model's tokenizer")
            template = HFChatTemplate(hf)
        else:
            template = chat_template_config.chat_template
    else:
        template = None
        if hf is not None and getattr(hf, 'chat_template', None):
            try:
                template = HFChatTemplate(hf)
            except Exception as e:  # noqa: BLE001 - a Jinja template may raise anything
                logger.warning("the model's chat template fails on a user/assistant exchange (%s: %s); "
                               'using a builtin template', type(e).__name__, e)
        if template is None:
            template = ChatTemplateConfig(match_template_name(model_path) or 'base').chat_template
    logger.info('chat template: %r, stop words %s', template, template.stop_words)
    return template
