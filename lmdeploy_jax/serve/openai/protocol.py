"""Request and response bodies of the server (OpenAI's shapes, plus LMDeploy's extra sampling fields).

Requests are validated by pydantic, so a bad field is refused before anything reaches the engine;
the error handlers turn the refusal into an OpenAI-shaped 400. Unknown fields are ignored, as
OpenAI-compatible servers do (clients send fields this server does not use).
"""
from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field


def random_id(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex}'


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields every generating endpoint shares; defaults are LMDeploy's server defaults."""
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True


class OpenAIRequest(SamplingFields):
    model: str
    n: int = Field(1, ge=1, le=64)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ContentPart(BaseModel):
    type: Literal['text']
    text: str


class ChatMessage(BaseModel):
    role: Literal['system', 'user', 'assistant']
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)   # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)


class GenerateRequest(SamplingFields):
    """LMDeploy's native ``/generate``: a session of its own id, kept between requests in interactive mode."""
    prompt: str | list[ChatMessage]
    session_id: int = -1
    interactive_mode: bool = False
    stream: bool = False
    request_output_len: int | None = Field(None, ge=1)
    do_preprocess: bool = True
    cancel: bool = False
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.8, ge=0.0, le=1.0)


class EncodeRequest(BaseModel):
    input: str | list[str]
    do_preprocess: bool = False
    add_bos: bool = True


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatDelta(BaseModel):
    role: Literal['assistant'] | None = None
    content: str | None = None


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
