"""OpenAI's routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (JSON or SSE)."""
from __future__ import annotations

import functools
import logging
import time
from contextlib import aclosing

from fastapi import APIRouter, Request

from ...chat_template_kwargs import resolve_template_kwargs
from ..reasoning_parsers import ReasoningParser
from .errors import APIError, error_body
from .generation import Job
from .protocol import ChatCompletionRequest, CompletionBody, CompletionRequest, OpenAIRequest, UsageInfo, random_id
from .sampling import chat_prompt_ids, generation_config, max_new_tokens, text_prompt_ids
from .shapes import ChatShape, CompletionShape
from .streaming import ClosingStreamingResponse, sse
from .tools import plan_tools

logger = logging.getLogger('lmdeploy_jax')
router = APIRouter()


@router.get('/v1/models')
@router.head('/v1/models', include_in_schema=False)
async def list_models(request: Request):
    name = request.app.state.server.model_name
    return {'object': 'list', 'data': [{'id': name, 'object': 'model', 'created': request.app.state.server.created,
                                        'owned_by': 'lmdeploy_jax', 'root': name, 'parent': None}]}


def _check_model(server, name: str) -> None:
    if name != server.model_name:
        raise APIError(404, f'The model {name!r} does not exist; this server serves {server.model_name!r}',
                       'model', 'model_not_found')


@router.post('/v1/chat/completions')
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server = request.app.state.server
    _check_model(server, body.model)
    plan = plan_tools(body, server.tool_call_format)
    template_kwargs = resolve_template_kwargs(body.chat_template_kwargs, body.enable_thinking, body.reasoning_effort)
    ids = chat_prompt_ids(server.engine, body, plan.rendered, template_kwargs)
    asked = body.max_completion_tokens or body.max_tokens
    new = max_new_tokens(asked, len(ids), server.engine.session_len,
                         'max_completion_tokens' if body.max_completion_tokens else 'max_tokens')
    top = (body.top_logprobs or 0) if body.logprobs else None
    vocab = server.engine.vocab_size
    skip = plan.skip_special_tokens(body.skip_special_tokens)
    jobs = [Job(i, generation_config(body, new, vocab, top, i, skip, plan.response_format or body.response_format),
                input_ids=ids) for i in range(body.n)]
    shape = ChatShape(server.engine.tokenizer, top, plan, _reasoning_parsers(server, ids, template_kwargs))
    return await _respond(request, body, jobs, shape, len(ids))


def _reasoning_parsers(server, prompt_ids: list[int], template_kwargs: dict):
    """A factory of one answer's ``ReasoningParser``, told whether the prompt's last tokens leave
    the reasoning open; None without ``--reasoning-parser``, and for a request whose template
    variable ``enable_thinking`` is false: its answer is all content (LMDeploy's rule)."""
    fmt = server.reasoning_format
    if fmt is None or template_kwargs.get('enable_thinking') is False:
        return None
    tail = server.engine.tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False)
    return functools.partial(ReasoningParser, fmt, fmt.prompt_opens_reasoning(tail))


@router.post('/v1/completions')
async def completions(body: CompletionRequest, request: Request):
    server = request.app.state.server
    _check_model(server, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    jobs, prompt_tokens = [], 0
    for p, prompt in enumerate(prompts):
        param = f'prompt.{p}' if len(prompts) > 1 else 'prompt'
        ids = text_prompt_ids(server.engine, prompt, param)
        new = max_new_tokens(body.max_tokens, len(ids), server.engine.session_len, prompt_param=param)
        prompt_tokens += len(ids)
        jobs += [Job(p * body.n + i, generation_config(body, new, server.engine.vocab_size, body.logprobs, i),
                     input_ids=ids)
                 for i in range(body.n)]
    return await _respond(request, body, jobs, CompletionShape(server.engine.tokenizer, body.logprobs), prompt_tokens)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


async def _respond(request: Request, body: OpenAIRequest, jobs: list[Job], shape, prompt_tokens: int):
    server = request.app.state.server
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return ClosingStreamingResponse(_events(server, jobs, shape, prompt_tokens, include_usage))
    results = await server.runner.collect(jobs, request)
    choices = [shape.choice(r.index, r.text, r.token_ids, r.logprobs, r.finish_reason) for r in results]
    return CompletionBody(id=random_id(shape.id_prefix), object=shape.object, created=int(time.time()),
                          model=server.model_name, choices=choices,
                          usage=_usage(prompt_tokens, sum(len(r.token_ids) for r in results)))


async def _events(server, jobs: list[Job], shape, prompt_tokens: int, include_usage: bool):
    """SSE chunks: an opening per choice (chat), the deltas as they come, usage if asked, then [DONE]."""
    head = dict(id=random_id(shape.id_prefix), object=shape.chunk_object, created=int(time.time()),
                model=server.model_name)

    def chunk(choices, usage=None) -> str:
        return sse(CompletionBody(**head, choices=choices, usage=usage).model_dump_json(exclude_unset=True))

    for job in jobs:
        if (opening := shape.opening(job.index)) is not None:
            yield chunk([opening])
    offsets = {job.index: 0 for job in jobs}
    completion_tokens, failed = 0, False
    try:
        async with aclosing(server.runner.stream(jobs)) as outs:
            async for index, out in outs:
                if out.finish_reason == 'error':
                    yield sse(error_body(400, out.response.removeprefix('error: ')))
                    failed = True
                    break
                completion_tokens += len(out.token_ids)
                yield chunk([shape.delta(index, out.response, out.token_ids, out.logprobs or [], out.finish_reason,
                                         offsets[index])])
                offsets[index] += len(out.response)
    except Exception as exc:  # noqa: BLE001 - the 200 is sent: the error is an event, then the stream's end
        logger.exception('a stream failed after it started')
        yield sse(error_body(500, f'the server failed while streaming: {exc}'))
        failed = True
    if include_usage and not failed:
        yield chunk([], _usage(prompt_tokens, completion_tokens))
    yield sse('[DONE]')
