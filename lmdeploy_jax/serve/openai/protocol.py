"""Request and response bodies of the server (OpenAI's shapes, plus LMDeploy's extra sampling fields).

Requests are validated by pydantic, so a bad field is refused before anything reaches the engine;
the error handlers turn the refusal into an OpenAI-shaped 400 naming the field. Every number is
bounded where it is declared (floats finite, integers within what the engine packs into int32),
booleans must be JSON booleans, and text must encode to UTF-8 (JSON can carry lone surrogates,
which no tokenizer takes). Unknown fields are ignored, as OpenAI-compatible servers do (clients
send fields this server does not use), except the OpenAI fields it does not implement, which are
refused unless they ask for nothing (``unsupported_fields.py``).
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, ValidationInfo, model_validator

from ...chat_template_kwargs import REASONING_EFFORTS, resolve_template_kwargs
from ...messages import INT32_MAX
from ...text_checks import require_utf8
from .limits import MAX_COMPLETION_CHOICES
from .sessions import CLIENT_SESSION_IDS
from .unsupported_fields import UnsupportedChatFields, UnsupportedCompletionFields


def _utf8(text: str, info: ValidationInfo) -> str:
    require_utf8(text, info.field_name)
    return text


Text = Annotated[str, AfterValidator(_utf8)]     # a str that encodes to UTF-8


def finite(default, **bounds):
    """A float field refusing NaN and infinities (JSON parsers take ``NaN``, ``Infinity``, ``1e999``)."""
    return Field(default, allow_inf_nan=False, **bounds)


def random_id(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex}'


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields every generating endpoint shares; defaults are LMDeploy's server defaults."""
    temperature: float = finite(0.7, ge=0.0, le=2.0)
    top_p: float = finite(1.0, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0, le=INT32_MAX)     # 0 disables it; the vocabulary bounds it too (sampling.py)
    min_p: float = finite(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = finite(1.0, gt=0.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 63)
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False     # LMDeploy's and vLLM's (GenerationConfig's)
    spaces_between_special_tokens: StrictBool = True


class OpenAIRequest(SamplingFields):
    model: Text
    n: int = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None


class ContentPart(BaseModel):
    type: Literal['text']
    text: Text


def _json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'must be a JSON object, is not JSON: {exc}') from None
    if not isinstance(value, dict):
        raise ValueError(f'must be a JSON object, got {type(value).__name__}')
    return text


class FunctionCall(BaseModel):
    name: Text
    arguments: Annotated[Text, AfterValidator(_json_object)]     # a JSON object's text, as OpenAI sends it


class ToolCall(BaseModel):
    id: Text
    type: Literal['function'] = 'function'
    function: FunctionCall


class DeltaToolCall(ToolCall):
    """A streamed call: whole (id, name and arguments at once), numbered in its answer."""
    index: int


class ChatMessage(BaseModel):
    role: Literal['system', 'user', 'assistant', 'tool']
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None       # an assistant's earlier calls
    tool_call_id: Text | None = None               # a tool result's call

    @model_validator(mode='after')
    def _tool_fields_fit_the_role(self):
        if self.tool_calls and self.role != 'assistant':
            raise ValueError(f'tool_calls belong to assistant messages, not {self.role!r} ones')
        if self.role == 'tool' and not self.tool_call_id:
            raise ValueError('a tool message needs the tool_call_id of the call it answers')
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r'^[A-Za-z0-9_-]{1,64}$')     # OpenAI's rule for function names
    description: Text | None = None
    parameters: dict | None = None      # a JSON schema
    strict: Literal[False] | None = None    # True: free calls held to the schema; only forced calls are


class ToolDefinition(BaseModel):
    type: Literal['function']
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal['function']
    function: FunctionName


def _template_kwargs(value: dict[str, Any]) -> dict[str, Any]:
    resolve_template_kwargs(value, None)      # refuses the keys the template call sets itself
    return value


class ChatCompletionRequest(OpenAIRequest, UnsupportedChatFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal['none', 'auto', 'required'] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    response_format: dict | None = None      # OpenAI's, or LMDeploy's regex_schema: messages.response_format_grammar
    # variables of the model's chat template (LMDeploy's, vLLM's; chat_template_kwargs.py), and the fields of two
    chat_template_kwargs: Annotated[dict[str, Any], AfterValidator(_template_kwargs)] | None = None
    enable_thinking: StrictBool | None = None
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None


class CompletionRequest(OpenAIRequest, UnsupportedCompletionFields):
    prompt: Text | list[Text] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)   # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode='after')
    def _bounded_choices(self):
        prompts = 1 if isinstance(self.prompt, str) else len(self.prompt)
        if prompts * self.n > MAX_COMPLETION_CHOICES:
            raise ValueError(f'{prompts} prompts x n={self.n} is over the limit of {MAX_COMPLETION_CHOICES} '
                             'choices a request')
        return self


class GenerateRequest(SamplingFields):
    """LMDeploy's native ``/generate``: a session of its own id, kept between requests in interactive mode."""
    prompt: Text | list[ChatMessage]
    session_id: int = Field(-1, ge=-1, lt=CLIENT_SESSION_IDS)   # -1: a session of the request alone
    interactive_mode: StrictBool = False
    stream: StrictBool = False
    request_output_len: int | None = Field(None, ge=1, le=INT32_MAX)
    do_preprocess: StrictBool = True
    cancel: StrictBool = False
    temperature: float = finite(0.8, ge=0.0, le=2.0)
    top_p: float = finite(0.8, ge=0.0, le=1.0)


class EncodeRequest(BaseModel):
    input: Text | list[Text]
    do_preprocess: StrictBool = False
    add_bos: StrictBool = True


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatDelta(BaseModel):
    role: Literal['assistant'] | None = None
    content: str | None = None
    reasoning_content: str | None = None     # with --reasoning-parser: the answer's reasoning (LMDeploy's, vLLM's)
    tool_calls: list[ToolCall] | list[DeltaToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class CompletionBody(BaseModel):
    """A chat completion, a text completion, or one streamed chunk of either."""
    id: str
    object: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice] | list[ChatStreamChoice] | list[CompletionChoice]
    usage: UsageInfo | None = None
