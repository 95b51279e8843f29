"""OpenAI request fields this server does not implement, refused unless they ask for nothing.

A client that sends ``presence_penalty=0.5`` or ``logit_bias`` expects an effect; an
answer that silently ignored it would look right and be wrong. Each field is declared with the
values that change nothing (OpenAI's defaults), and anything else is a 400 whose ``param`` names
the field and whose message says what to use instead. Fields that change no answer (``metadata``,
``store``, ``service_tier``) stay ignored, as unknown fields are.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel


def refused(*harmless, why: str):
    """A field type accepting None and the ``harmless`` values, refusing any other with ``why``."""
    def check(value):
        if value is not None and value not in harmless:
            raise ValueError(f'{value!r} is not supported: {why}')
        return value
    return Annotated[Any, AfterValidator(check)]


class UnsupportedSamplingFields(BaseModel):
    frequency_penalty: refused(0, why='use repetition_penalty (LMDeploy\'s)') = None
    presence_penalty: refused(0, why='use repetition_penalty (LMDeploy\'s)') = None
    logit_bias: refused({}, why='no logits processors on this server') = None


class UnsupportedChatFields(UnsupportedSamplingFields):
    functions: refused([], why='the deprecated functions API is not served; use tools') = None
    function_call: refused('none', why='the deprecated functions API is not served; use tool_choice') = None
    modalities: refused(['text'], why='text is the only output') = None
    audio: refused(why='text is the only output') = None
    prediction: refused(why='predicted outputs are not implemented') = None


class UnsupportedCompletionFields(UnsupportedSamplingFields):
    echo: refused(False, why='the prompt is not repeated in the answer') = None
    suffix: refused('', why='no infilling') = None
    best_of: refused(1, why='use n') = None
