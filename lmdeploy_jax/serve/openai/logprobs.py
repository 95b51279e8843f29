"""The engine's per-token ``{token_id: logprob}`` (sampled token first, then the top ones) in OpenAI's shapes."""
from __future__ import annotations


def _top(lp: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])[:n]


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int) -> dict:
    """``choices[i].logprobs`` of a chat completion: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(token_id: int, lp: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {'token': text, 'logprob': lp, 'bytes': list(text.encode('utf-8'))}
    return {'content': [{**entry(t, lp[t]), 'top_logprobs': [entry(i, v) for i, v in _top(lp, top_n)]}
                        for t, lp in zip(token_ids, logprobs)]}


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int,
                        text_offset: int = 0) -> dict:
    """``choices[i].logprobs`` of a text completion: parallel lists of tokens, logprobs, top maps, offsets."""
    tokens = [_token_text(tokenizer, t) for t in token_ids]
    offsets, at = [], text_offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {'tokens': tokens, 'token_logprobs': [lp[t] for t, lp in zip(token_ids, logprobs)],
            'top_logprobs': [{_token_text(tokenizer, i): v for i, v in _top(lp, top_n)} for lp in logprobs],
            'text_offset': offsets}
