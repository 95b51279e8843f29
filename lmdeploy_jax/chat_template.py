"""Chat templates: turn a prompt or an OpenAI-style message list into the text a model was tuned on.

LMDeploy's scheme (``lmdeploy/model.py``): a template is a handful of strings
(``{system}{meta_instruction}{eosys}{user}..{eoh}{assistant}..{eoa}{separator}{user}..``), a few
builtins carry the strings of well-known model families, and a model that ships its own Jinja
template (``tokenizer.chat_template``) is rendered through Hugging Face's ``apply_chat_template``.

``sequence_start=False`` renders the next turn of an interactive session whose token history
already ends with the previous reply and the end-of-answer token the model generated, so the
history plus the continuation tokenizes like the whole conversation rendered at once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Callable

from .chat_template_kwargs import TemplateArgumentError, refuse_all, refuse_unread
from .tool_messages import hermes_messages, tool_calls_with_objects, uses_tools

logger = logging.getLogger('lmdeploy_jax')

_ROLES = ('system', 'user', 'assistant')
_CAPABILITIES = ('completion', 'infilling', 'chat', 'python')
HF_TEMPLATE_NAME = 'hf'


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
        elif _canonical(self.model_name) is None and not self.overrides():
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
        name = _canonical(self.model_name)
        if name is None:
            logger.info('chat template %r is not a builtin: using the given fields alone', self.model_name)
            return BaseChatTemplate(name=self.model_name, **self.overrides())
        spec = _BUILTINS[name]
        return spec.cls(name=name, **{**spec.fields, **self.overrides()})


def _text(content) -> str:
    """Message content as text: a string, None (an assistant turn holding tool calls only), or
    OpenAI content parts whose text parts are joined."""
    if content is None:
        return ''
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return ''.join(p.get('text', '') for p in content if p.get('type', 'text') == 'text')
    raise ValueError(f'message content must be a string or a list of content parts, got {type(content).__name__}')


def normalize_messages(messages, roles=_ROLES) -> list[dict]:
    """Messages as ``[{'role', 'content': str}]``; a string is one user turn. An assistant message
    keeps its ``tool_calls`` (``tool_calls_with_objects``), a tool message its ``tool_call_id`` and ``name``.
    Bad input -> ValueError."""
    if isinstance(messages, str):
        return [{'role': 'user', 'content': messages}]
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f'messages must be a string or a non-empty list of messages, got {messages!r}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or 'role' not in m:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {m!r}')
        if m['role'] not in roles:
            raise ValueError(f'message {i} has role {m["role"]!r}; allowed roles: {", ".join(roles)}')
        message = {'role': m['role'], 'content': _text(m.get('content'))}
        if m['role'] == 'assistant' and m.get('tool_calls'):
            message['tool_calls'] = tool_calls_with_objects(m['tool_calls'], i)
        if m['role'] == 'tool':
            message.update({k: m[k] for k in ('tool_call_id', 'name') if m.get(k) is not None})
        out.append(message)
    return out


class BaseChatTemplate:
    """LMDeploy's string template; with every string empty (``base``) the prompt passes as it is."""

    def __init__(self, name: str = 'base', system: str = '', meta_instruction: str | None = '',
                 eosys: str = '', user: str = '', eoh: str = '', assistant: str = '', eoa: str = '',
                 separator: str = '', capability: str = 'chat', stop_words: list[str] | None = None):
        self.name = name
        self.system, self.meta_instruction, self.eosys = system, meta_instruction, eosys
        self.user, self.eoh, self.assistant, self.eoa = user, eoh, assistant, eoa
        self.separator = separator
        self.capability = capability
        self.stop_words: list[str] = list(stop_words or [])

    def generation_prompt(self) -> str:
        """What ends a prompt so that the model writes the assistant's answer."""
        return self.assistant

    def begin_of_text(self) -> str:
        """Text that opens a session (none unless the template writes the BOS itself)."""
        return ''

    def render_tools(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """Fold ``tools``, tool calls and tool results into plain messages; this template renders
        none, so any of them is a ValueError (a template that does overrides this)."""
        raise ValueError(f'the chat template {self.name!r} does not render tools, tool calls or tool results; '
                         "use the model's own template if it renders them, or the builtin 'qwen' (Hermes style)")

    def messages2prompt(self, messages, sequence_start: bool = True, tools: list[dict] | None = None,
                        **template_kwargs) -> str:
        """Render ``messages`` (a str prompt or an OpenAI message list) ending with the assistant prompt,
        or, when the last message is the assistant's, ending with its text for the model to continue.
        ``tools`` (OpenAI's ``[{'type': 'function', 'function': {...}}]``) go where the template puts them.
        A builtin has no template variables: any ``template_kwargs`` is a ``TemplateArgumentError``."""
        refuse_all(self.name, template_kwargs)
        if isinstance(messages, str) and self.capability == 'completion' and not tools:
            return messages
        if tools or uses_tools(messages):
            messages = self.render_tools(normalize_messages(messages, (*_ROLES, 'tool')), tools)
        messages = normalize_messages(messages)
        box = {'system': self.system, 'user': self.user, 'assistant': self.assistant}
        eox = {'system': self.eosys, 'user': self.eoh, 'assistant': self.eoa + self.separator}
        if sequence_start:
            ret = self.begin_of_text()
            if self.meta_instruction is not None and messages[0]['role'] != 'system':
                ret += f'{self.system}{self.meta_instruction}{self.eosys}'
        else:
            ret = self.separator
        for m in messages:
            ret += f'{box[m["role"]]}{m["content"]}{eox[m["role"]]}'
        if messages[-1]['role'] == 'assistant':
            end = eox['assistant']
            return ret[:len(ret) - len(end)]  # the assistant's prefix, to be continued
        return ret + self.generation_prompt()

    def __repr__(self):
        return f'{type(self).__name__}(name={self.name!r})'


class HermesToolsTemplate(BaseChatTemplate):
    """ChatML with tools as Qwen2.5's own template renders them (the Hermes convention): the tool
    signatures in the system turn, calls as ``<tool_call>{json}</tool_call>`` in the assistant's,
    consecutive tool results as ``<tool_response>`` blocks of one user turn."""

    def render_tools(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        return hermes_messages(messages, tools, self.meta_instruction or '')


class Llama3Template(BaseChatTemplate):
    """Llama 3 writes ``<|begin_of_text|>`` in the prompt (its tokenizer skips it then)."""

    def begin_of_text(self) -> str:
        return '<|begin_of_text|>'


class NoTrailingSpaceTemplate(BaseChatTemplate):
    """Vicuna and DeepSeek end the prompt with ``ASSISTANT:`` / ``Assistant:``, without the space
    their history turns carry (LMDeploy's ``[:-1]``): the model writes that space itself."""

    def generation_prompt(self) -> str:
        return self.assistant[:-1] if self.assistant.endswith(' ') else self.assistant


_INTERNLM_META = (
    'You are an AI assistant whose name is InternLM (书生·浦语).\n'
    '- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory '
    '(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n'
    '- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user such as '
    'English and 中文.\n')
_LLAMA2_META = (
    'You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being '
    'safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal '
    'content. Please ensure that your responses are socially unbiased and positive in nature.\n\n'
    'If a question does not make any sense, or is not factually coherent, explain why instead of answering '
    "something not correct. If you don't know the answer to a question, please don't share false information.")
_VICUNA_META = ('A chat between a curious user and an artificial intelligence assistant. The assistant gives '
                "helpful, detailed, and polite answers to the user's questions.")
_CHATML = dict(system='<|im_start|>system\n', eosys='<|im_end|>\n', user='<|im_start|>user\n',
               eoh='<|im_end|>\n', assistant='<|im_start|>assistant\n', eoa='<|im_end|>', separator='\n')


@dataclass(frozen=True)
class _Builtin:
    fields: dict
    match: Callable[[str], bool] | None = None   # does a (lower-cased) model path belong to it?
    cls: type = BaseChatTemplate


# Order matters for matching a model path: the first match wins.
_BUILTINS: dict[str, _Builtin] = {
    'llama3': _Builtin(dict(system='<|start_header_id|>system<|end_header_id|>\n\n', meta_instruction=None,
                            eosys='<|eot_id|>', user='<|start_header_id|>user<|end_header_id|>\n\n',
                            eoh='<|eot_id|>', assistant='<|start_header_id|>assistant<|end_header_id|>\n\n',
                            eoa='<|eot_id|>', stop_words=['<|eot_id|>', '<|end_of_text|>']),
                       lambda p: 'llama-3' in p or 'llama3' in p, Llama3Template),
    'llama2': _Builtin(dict(system='[INST] <<SYS>>\n', meta_instruction=_LLAMA2_META, eosys='\n<</SYS>>\n\n',
                            assistant=' [/INST] ', eoa='</s>', separator='<s>[INST] '),
                       lambda p: 'llama-2' in p or 'llama2' in p),
    'internlm2': _Builtin(dict(_CHATML, meta_instruction=_INTERNLM_META, stop_words=['<|im_end|>', '<|action_end|>']),
                          lambda p: 'internlm2' in p),
    'qwen': _Builtin(dict(_CHATML, meta_instruction='You are a helpful assistant.', stop_words=['<|im_end|>']),
                     lambda p: 'qwen' in p, HermesToolsTemplate),
    'mistral': _Builtin(dict(user='[INST] ', eoh=' [/INST]', eoa='</s>'),
                        lambda p: ('mistral' in p or 'mixtral' in p) and 'instruct' in p),
    'vicuna': _Builtin(dict(meta_instruction=_VICUNA_META, eosys=' ', user='USER: ', eoh=' ', assistant='ASSISTANT: ',
                            eoa='</s>', stop_words=['</s>']),
                       lambda p: 'vicuna' in p or 'wizardlm' in p, NoTrailingSpaceTemplate),
    'deepseek': _Builtin(dict(user='User: ', eoh='\n\n', assistant='Assistant: ', eoa='<｜end▁of▁sentence｜>'),
                         lambda p: 'deepseek' in p and 'chat' in p, NoTrailingSpaceTemplate),
    # LMDeploy's eoa '<end_of_turn>\n' split into eoa + separator: the same renderings, and an
    # interactive next turn restores the '\n' after the '<end_of_turn>' the model generated.
    'gemma': _Builtin(dict(user='<start_of_turn>user\n', eoh='<end_of_turn>\n', assistant='<start_of_turn>model\n',
                           eoa='<end_of_turn>', separator='\n', stop_words=['<end_of_turn>']),
                      lambda p: 'gemma' in p),
    'base': _Builtin({}),
}
_ALIASES = {'chatml': 'qwen', 'qwen2': 'qwen', 'mixtral': 'mistral', 'wizardlm': 'vicuna', 'llama-2': 'llama2',
            'llama-3': 'llama3', 'internlm2-chat': 'internlm2', 'deepseek-chat': 'deepseek'}


def _canonical(name: str) -> str | None:
    name = _ALIASES.get(name, name)
    return name if name in _BUILTINS else None


def list_templates() -> list[str]:
    """Every name a ChatTemplateConfig may give: the builtins, their aliases and 'hf'."""
    return sorted([*_BUILTINS, *_ALIASES, HF_TEMPLATE_NAME])


def match_template_name(model_path: str | None) -> str | None:
    """The builtin whose family appears in ``model_path`` (e.g. '.../Llama-3-8B' -> 'llama3'), or None."""
    path = (model_path or '').lower()
    return next((name for name, spec in _BUILTINS.items() if spec.match and spec.match(path)), None)


class HFChatTemplate:
    """The model's own Jinja chat template, rendered by ``tokenizer.apply_chat_template``.

    Its stop words are the EOS token and the special token the template closes an assistant turn
    with (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) when that is another one.
    """

    name = HF_TEMPLATE_NAME
    _PROBE_USER, _PROBE_REPLY = 'lmdeploy-jax-probe-user', 'lmdeploy-jax-probe-reply'
    _PROBE = ({'role': 'user', 'content': _PROBE_USER}, {'role': 'assistant', 'content': _PROBE_REPLY})

    def __init__(self, hf_tokenizer):
        if not getattr(hf_tokenizer, 'chat_template', None):
            raise ValueError('the tokenizer ships no chat template')
        self.tokenizer = hf_tokenizer
        self.stop_words: list[str] = [hf_tokenizer.eos_token] if hf_tokenizer.eos_token else []
        self._end_of_answer = self._find_end_of_answer()
        if self._end_of_answer and self._end_of_answer not in self.stop_words:
            self.stop_words.append(self._end_of_answer)

    def _render(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
        end = 'continue_final_message' if messages[-1]['role'] == 'assistant' else 'add_generation_prompt'
        try:
            return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **{end: True},
                                                      **template_kwargs)
        except TypeError as exc:     # a variable of a type the template cannot use ('text' + 5)
            if not template_kwargs:
                raise
            raise TemplateArgumentError(None, f'the chat template fails on its arguments: {exc}') from exc

    def _after_probe(self, messages: list[dict], **template_kwargs) -> str:
        """The render of ``messages`` behind a probe exchange, from the end of the probe's reply on."""
        text = self._render([*self._PROBE, *messages], **template_kwargs)
        return text[text.index(self._PROBE_REPLY) + len(self._PROBE_REPLY):]

    def _find_end_of_answer(self) -> str | None:
        tok = self.tokenizer
        specials = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
        after = self._after_probe([{'role': 'user', 'content': self._PROBE_USER}]).lstrip()
        return next((s for s in sorted(specials, key=len, reverse=True) if s and after.startswith(s)), None)

    def messages2prompt(self, messages, sequence_start: bool = True, tools: list[dict] | None = None,
                        **template_kwargs) -> str:
        """Render like ``apply_chat_template(..., add_generation_prompt=True, **template_kwargs)``
        (``continue_final_message`` when the last message is the assistant's). ``tools`` go to the
        template; one that renders the same text without them ignores them, and that is a ValueError
        rather than a silent drop. ``template_kwargs`` (``chat_template_kwargs.resolve_template_kwargs``)
        are the template's variables; one it never reads is a ``TemplateArgumentError``."""
        refuse_unread(self.tokenizer.get_chat_template(None, tools or None), template_kwargs)
        messages = normalize_messages(messages, roles=(*_ROLES, 'tool'))
        if tools:
            if not sequence_start:
                raise ValueError('tools are rendered at the start of a conversation only (sequence_start=True)')
            text = self._render(messages, tools, **template_kwargs)
            if text == self._render(messages, **template_kwargs):
                raise ValueError("the model's chat template does not render tools; choose a template that does "
                                 "(the builtin 'qwen' renders them in the Hermes style)")
            return text
        if sequence_start:
            return self._render(messages, **template_kwargs)
        # Behind a probe exchange the template's default system prompt and per-conversation openers
        # stay in the probe; the session history already holds what closes the reply: the
        # end-of-answer token the model generated.
        rest = self._after_probe(messages, **template_kwargs)
        if self._end_of_answer and rest.lstrip().startswith(self._end_of_answer):
            rest = rest.lstrip()[len(self._end_of_answer):]
        return rest

    def __repr__(self):
        return f'HFChatTemplate(stop_words={self.stop_words!r})'


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
