"""``output_logits`` and ``output_last_hidden_state`` (LMDeploy's ``GenerationConfig`` fields): an
answer's logits and final-normed hidden states, as ``Response.logits`` and
``Response.last_hidden_state``.

They are computed once the answer is complete, by one teacher-forced forward pass of the prompt and
the returned tokens on the backend's own model and weights (``InferenceEngine.token_states``), so
the decode steps never carry them. LMDeploy's rows: ``'all'`` has one row per position of the
prompt followed by the answer's ``token_ids``, but the last (row i predicts token i + 1);
``'generation'`` keeps the rows that predict the answer's tokens, ``len(token_ids)`` of them. The
arrays are float32 numpy (torch is an optional extra here; ``torch.from_numpy`` gives LMDeploy's
tensor without a copy).
"""
from __future__ import annotations

import asyncio

import numpy as np

from ..engine_api import InferenceEngine
from ..messages import GenerationConfig


def wants_states(config: GenerationConfig) -> bool:
    return config.output_logits is not None or config.output_last_hidden_state is not None


def check_context(config: GenerationConfig, history: int) -> None:
    """ValueError when the request continues a session (``history`` tokens held before its prompt):
    the pass would need the session's earlier tokens, which the AsyncEngine does not keep."""
    if wants_states(config) and history:
        raise ValueError(f'output_logits and output_last_hidden_state need a request that starts its session '
                         f'(this one follows {history} tokens of history); pass the whole conversation as messages')


def _rows(kind: str | None, states: np.ndarray | None, prompt_len: int) -> np.ndarray | None:
    """``states`` (one row per position but the last) cut to ``kind``'s rows."""
    if kind is None:
        return None
    return states if kind == 'all' else states[prompt_len - 1:]


async def answer_states(engine: InferenceEngine, prompt_ids: list[int], token_ids: list[int],
                        config: GenerationConfig) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(logits ``[rows, vocab]``, last hidden state ``[rows, hidden]``) of the answer ``token_ids``
    to ``prompt_ids``, as ``config`` asks (None where it does not), computed on the engine's
    thread while the event loop goes on."""
    want_logits, want_hidden = config.output_logits is not None, config.output_last_hidden_state is not None
    [(logits, hidden)] = await asyncio.get_running_loop().run_in_executor(
        None, engine.token_states, [list(prompt_ids) + list(token_ids)], want_logits, want_hidden)
    return (_rows(config.output_logits, None if logits is None else logits[:-1], len(prompt_ids)),
            _rows(config.output_last_hidden_state, None if hidden is None else hidden[:-1], len(prompt_ids)))
