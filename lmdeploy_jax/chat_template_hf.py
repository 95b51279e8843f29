"""The model's own Jinja chat template (``tokenizer.chat_template``), rendered by Hugging Face's
``apply_chat_template``: ``HFChatTemplate``, the ``'hf'`` chat template.

``sequence_start=False`` renders the next turn of an interactive session whose token history
already ends with the previous reply and the end-of-answer token the model generated, so the
history plus the continuation tokenizes like the whole conversation rendered at once.
"""
from __future__ import annotations

from .chat_template_kwargs import TemplateArgumentError, refuse_unread
from .chat_template_messages import ROLES, normalize_messages

HF_TEMPLATE_NAME = 'hf'


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
        messages = normalize_messages(messages, roles=(*ROLES, 'tool'))
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
