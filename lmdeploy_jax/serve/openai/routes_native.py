"""LMDeploy's native routes: ``/generate`` (sessions, interactive mode), ``/v1/encode``, ``/health``, ``/metrics``."""
from __future__ import annotations

import json
from contextlib import aclosing

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import APIError
from .generation import Job, Result
from .protocol import EncodeRequest, GenerateRequest
from .sampling import generation_config
from .streaming import ClosingStreamingResponse

router = APIRouter()


@router.get('/health')
async def health():
    return Response(status_code=200)


@router.get('/metrics')
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
    next request of the same ``session_id``; ``interactive_mode=false`` ends it; ``cancel`` aborts it."""
    server = request.app.state.server
    if body.session_id == -1 and (body.interactive_mode or body.cancel):
        raise APIError(400, 'interactive_mode and cancel need the session_id of the session', 'session_id')
    if body.cancel:
        server.engine.stop_session(body.session_id)
        return {'text': '', 'tokens': 0, 'input_tokens': 0, 'history_tokens': 0, 'finish_reason': 'abort'}
    session_id = None if body.session_id == -1 else body.session_id
    prompt = body.prompt if isinstance(body.prompt, str) else [m.model_dump(exclude_none=True) for m in body.prompt]
    config = generation_config(body, body.request_output_len or server.engine.session_len)
    job = Job(0, config, prompt=prompt, session_id=session_id, do_preprocess=body.do_preprocess,
              sequence_start=session_id not in server.open_sessions, sequence_end=not body.interactive_mode)

    def record(result: Result) -> None:
        if result.finish_reason != 'error' and session_id is not None:
            (server.open_sessions.add if body.interactive_mode else server.open_sessions.discard)(session_id)

    if not body.stream:
        [result] = await server.runner.collect([job], request)
        record(result)
        return _reply(result)

    async def lines():
        result = Result(0)
        async with aclosing(server.runner.stream([job])) as outs:
            async for _, out in outs:
                result.add(out)
                yield json.dumps({**_reply(result), 'text': out.response}) + '\n'
        record(result)
    return ClosingStreamingResponse(lines(), media_type='application/x-ndjson')
