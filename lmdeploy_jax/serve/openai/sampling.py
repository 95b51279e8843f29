"""From a request body to what the AsyncEngine runs: prompt token ids and a ``GenerationConfig``.

Prompts are tokenized here, before anything is queued, so a request longer than the context is
refused with a 400 that says by how much (OpenAI's ``context_length_exceeded``), not cut short.
"""
from __future__ import annotations

from jinja2 import TemplateError

from ...chat_template_kwargs import TemplateArgumentError, source_field
from ...messages import GenerationConfig
from .errors import APIError
from .protocol import ChatCompletionRequest, SamplingFields


def generation_config(req: SamplingFields, max_new_tokens: int, vocab_size: int, logprobs: int | None = None,
                      seed_offset: int = 0, skip_special_tokens: bool | None = None,
                      response_format: dict | None = None) -> GenerationConfig:
    """LMDeploy's server mapping: sampling on (temperature 0 is greedy), stop strings as stop words.

    ``seed_offset`` makes the n choices of one seeded request independent yet reproducible;
    ``skip_special_tokens`` overrides the request's (a tool-call parser whose tags are special
    tokens needs them in the text); ``response_format`` constrains the answer (guided decoding).
    The config is checked against the model's ``vocab_size`` too (``top_k``), so that a bad one is
    refused before any stream starts: an ``APIError`` 400 whose message and ``param`` name the
    request's field (``stop``, not the config's ``stop_words``).
    """
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    try:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=req.temperature,
                                  top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                                  repetition_penalty=req.repetition_penalty, ignore_eos=req.ignore_eos,
                                  random_seed=None if req.seed is None else req.seed + seed_offset,
                                  stop_words=stop or None, logprobs=logprobs, response_format=response_format,
                                  include_stop_str_in_output=req.include_stop_str_in_output,
                                  spaces_between_special_tokens=req.spaces_between_special_tokens,
                                  skip_special_tokens=(req.skip_special_tokens if skip_special_tokens is None
                                                       else skip_special_tokens))
        config.validate(vocab_size)
    except ValueError as exc:
        raise _request_field_error(exc, isinstance(req.stop, str)) from None
    return config


# GenerationConfig's field -> the request's, where they differ (the rest share their names)
_REQUEST_FIELDS = {'stop_words': 'stop', 'random_seed': 'seed'}


def _request_field_error(exc: ValueError, single_stop: bool) -> APIError:
    """A config's refusal ('stop_words[0] must be ...') as a 400 naming the request's field ('stop')."""
    field, _, rest = str(exc).partition(' ')
    name, index = field.partition('[')[0], field[len(field.partition('[')[0]):]
    param = _REQUEST_FIELDS.get(name, name)
    if param == 'stop' and single_stop:
        index = ''
    return APIError(400, f'{param}{index} {rest}', param)


def max_new_tokens(requested: int | None, prompt_len: int, session_len: int, param: str = 'max_tokens',
                   prompt_param: str = 'messages') -> int:
    """``requested`` when it fits the context after the prompt; all the room left when None. A 400
    names ``prompt_param`` when the prompt alone fills the context, else ``param``."""
    room = session_len - prompt_len
    if room <= 0 or (requested is not None and requested > room):
        asked = prompt_len + (requested or 0)
        raise APIError(400, f"This model's maximum context length is {session_len} tokens. However, you "
                            f'requested {asked} tokens ({prompt_len} in the prompt, {requested or 0} in the '
                            'completion). Please reduce the length of the prompt or the completion.',
                       param if room > 0 else prompt_param, 'context_length_exceeded')
    return room if requested is None else requested


def session_prompt_ids(engine, prompt: str | list[dict], sequence_start: bool, do_preprocess: bool,
                       tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """A prompt's token ids as LMDeploy's ``/generate`` renders it: through the chat template when
    ``do_preprocess`` (a str is one user turn; the system prompt only at a session's start), else
    the str as it is; with BOS at a session's start. ``tools`` and ``template_kwargs`` (the
    template's variables) go to the chat template. Refusals are 400s naming ``prompt`` (a template
    that cannot render the tools: ``tools``), except a ``TemplateArgumentError``, raised as it is."""
    if do_preprocess:
        try:
            text = engine.chat_template.messages2prompt(prompt, sequence_start, tools=tools, **(template_kwargs or {}))
        except TemplateArgumentError:
            raise
        except (ValueError, TemplateError) as exc:   # the template's own refusals (raise_exception) too
            raise APIError(400, str(exc), 'tools' if tools else 'messages') from None
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise APIError(400, 'prompt must be a str when do_preprocess is false', 'prompt')
    ids = engine.tokenizer.encode(text, add_bos=sequence_start) if text else []
    if not ids:
        raise APIError(400, 'prompt is empty' if not text else 'prompt encodes to no tokens', 'prompt')
    return ids


def chat_prompt_ids(engine, req: ChatCompletionRequest, tools: list[dict] | None, template_kwargs: dict) -> list[int]:
    """The conversation (and ``tools``) rendered by the model's chat template with the variables
    ``template_kwargs`` (``resolve_template_kwargs`` of the request's), then tokenized (with BOS
    where the model has one). A variable the template cannot take is a 400 naming the request
    field that gave it (``chat_template_kwargs``, ``enable_thinking``, ``reasoning_effort``)."""
    try:
        return session_prompt_ids(engine, [m.model_dump(exclude_none=True) for m in req.messages], True, True,
                                  tools, template_kwargs)
    except TemplateArgumentError as exc:
        param = source_field(exc.key, req.chat_template_kwargs, req.enable_thinking, req.reasoning_effort)
        raise APIError(400, str(exc) if param == 'chat_template_kwargs' else f'{param}: {exc.reason}', param) from None


def text_prompt_ids(engine, prompt: str, param: str = 'prompt') -> list[int]:
    """A raw prompt (no chat template), as ``/v1/completions`` takes it."""
    if not prompt:
        raise APIError(400, f'{param} is empty', param)
    return engine.tokenizer.encode(prompt, add_bos=True)
