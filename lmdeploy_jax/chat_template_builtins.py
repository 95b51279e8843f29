"""The builtin chat templates (LMDeploy's ``lmdeploy/model.py`` scheme): a template is a handful of
strings (``{system}{meta_instruction}{eosys}{user}..{eoh}{assistant}..{eoa}{separator}{user}..``),
and each builtin carries the strings of a well-known model family.

``BUILTINS`` holds them by name and alias (``NamedFormats``: ``BUILTINS.get(name)`` is the
``_Builtin`` spec, its ``cls`` built with its ``fields``); ``match_template_name`` finds the builtin
of a model path. ``sequence_start=False`` renders the next turn of an interactive session whose
token history already ends with the previous reply and the end-of-answer token the model generated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .chat_template_kwargs import refuse_all
from .chat_template_messages import ROLES, normalize_messages
from .named_formats import NamedFormats
from .tool_messages import hermes_messages, uses_tools


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
            messages = self.render_tools(normalize_messages(messages, (*ROLES, 'tool')), tools)
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
_FORMATS: dict[str, _Builtin] = {
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
BUILTINS = NamedFormats('chat template', _FORMATS, _ALIASES)


def match_template_name(model_path: str | None) -> str | None:
    """The builtin whose family appears in ``model_path`` (e.g. '.../Llama-3-8B' -> 'llama3'), or None."""
    path = (model_path or '').lower()
    return next((name for name, spec in BUILTINS.formats.items() if spec.match and spec.match(path)), None)
