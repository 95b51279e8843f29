"""LMDeploy's native routes: ``/generate`` (sessions, interactive mode), ``/v1/encode``, ``/health``, ``/metrics``."""
from __future__ import annotations

import json
import logging
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import APIError
from .generation import Job, Result
from .middleware import request_owner
from .protocol import EncodeRequest, GenerateRequest
from .sampling import generation_config, max_new_tokens, session_prompt_ids
from .sessions import owned_session_id
from .streaming import ClosingStreamingResponse

logger = logging.getLogger('lmdeploy_jax')
router = APIRouter()


@router.get('/health')
@router.head('/health', include_in_schema=False)   # HEAD wherever GET (probes use it), out of the schema
async def health():
    return Response(status_code=200)


@router.get('/metrics')
@router.head('/metrics', include_in_schema=False)
async def metrics(request: Request):
    return Response(request.app.state.server.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post('/v1/encode')
async def encode(body: EncodeRequest, request: Request):
    engine = request.app.state.server.engine
    texts = [body.input] if isinstance(body.input, str) else body.input
    if body.do_preprocess:
        texts = [engine.chat_template.messages2prompt(t, True) for t in texts]
    ids = [engine.tokenizer.encode(t, add_bos=body.add_bos) for t in texts]
    if isinstance(body.input, str):
        return {'input_ids': ids[0], 'length': len(ids[0])}
    return {'input_ids': ids, 'length': [len(i) for i in ids]}


def _reply(result: Result) -> dict:
    return {'text': result.text, 'tokens': len(result.token_ids), 'input_tokens': result.prompt_tokens,
            'history_tokens': result.history_tokens, 'finish_reason': result.finish_reason}


@router.post('/generate')
async def generate(body: GenerateRequest, request: Request):
    """One request of a session. In interactive mode the session keeps its history (and KV) for the
    next request of the same ``session_id``; ``interactive_mode=false`` ends it; ``cancel`` aborts it.
    A ``session_id`` names a session of the request's API key only (``sessions.py``)."""
    server = request.app.state.server
    if body.session_id == -1 and (body.interactive_mode or body.cancel):
        raise APIError(400, 'interactive_mode and cancel need the session_id of the session', 'session_id')
    session_id = None if body.session_id == -1 else owned_session_id(request_owner(request), body.session_id)
    if body.cancel:
        server.engine.stop_session(session_id)
        return {'text': '', 'tokens': 0, 'input_tokens': 0, 'history_tokens': 0, 'finish_reason': 'abort'}
    sequence_start = session_id not in server.open_sessions
    prompt = body.prompt if isinstance(body.prompt, str) else [m.model_dump(exclude_none=True) for m in body.prompt]
    ids = session_prompt_ids(server.engine, prompt, sequence_start, body.do_preprocess)
    if sequence_start:
        max_new_tokens(None, len(ids), server.engine.session_len, prompt_param='prompt')
    config = generation_config(body, body.request_output_len or server.engine.session_len, server.engine.vocab_size)
    job = Job(0, config, input_ids=ids, session_id=session_id, sequence_start=sequence_start,
              sequence_end=not body.interactive_mode)

    def record(result: Result) -> None:
        if result.finish_reason != 'error' and session_id is not None:
            (server.open_sessions.add if body.interactive_mode else server.open_sessions.discard)(session_id)

    if not body.stream:
        [result] = await server.runner.collect([job], request)
        record(result)
        return _reply(result)

    return ClosingStreamingResponse(_lines(server.runner, job, record), media_type='application/x-ndjson')


async def _lines(runner, job: Job, record) -> AsyncIterator[str]:
    """/generate's stream: a JSON line per increment, the last with ``finish_reason``; ``record``
    gets the whole result at a normal end. A failure after the 200 is a last line of its own."""
    result = Result(0)
    try:
        async with aclosing(runner.stream([job])) as outs:
            async for _, out in outs:
                result.add(out)
                yield json.dumps({**_reply(result), 'text': out.response}) + '\n'
    except Exception as exc:  # noqa: BLE001 - the 200 is sent: the error is the stream's last line
        logger.exception('/generate failed after its stream started')
        yield json.dumps({**_reply(result), 'text': '', 'finish_reason': 'error', 'error': str(exc)}) + '\n'
        return
    record(result)
