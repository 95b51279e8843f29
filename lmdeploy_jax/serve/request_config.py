"""From a user's generation settings to what the backend runs: LMDeploy's argument mapping.

Old keyword arguments (``request_output_len``, ``top_k``, ...) override ``GenerationConfig``;
stop strings that are single tokens become stop ids (the engine stops on them in the step), the
rest are matched on the text; EOS ids (tokenizer + generation_config.json) join the stop ids;
``ignore_eos`` turns every stop id into a bad id, as LMDeploy does.
"""
from __future__ import annotations

from ..messages import GenerationConfig
from .unsupported import refuse_adapter, refuse_unknown_keywords

_LEGACY_KWARGS = {
    'request_output_len': 'max_new_tokens',
    'top_k': 'top_k',
    'top_p': 'top_p',
    'temperature': 'temperature',
    'repetition_penalty': 'repetition_penalty',
    'stop_words': 'stop_words',
}


def merge_gen_config(gen_config: GenerationConfig | None, ignore_eos: bool = False, adapter_name: str | None = None,
                     **legacy) -> GenerationConfig:
    """``gen_config`` (or the default) with LMDeploy's legacy keyword arguments applied; a bad
    value raises ``ValueError`` naming it, a keyword that is not one of them ``TypeError``, and an
    ``adapter_name`` other than None ``ValueError`` (no LoRA adapters)."""
    refuse_unknown_keywords('the call', {k: v for k, v in legacy.items() if k not in _LEGACY_KWARGS},
                            'generation settings go in gen_config=GenerationConfig(...); the keywords LMDeploy '
                            f'maps onto it are {", ".join(_LEGACY_KWARGS)} and ignore_eos')
    refuse_adapter(adapter_name)
    if gen_config is not None and not isinstance(gen_config, GenerationConfig):
        raise ValueError(f'gen_config must be a GenerationConfig or None, got {type(gen_config).__name__}')
    config = gen_config if gen_config is not None else GenerationConfig()
    changes = {_LEGACY_KWARGS[k]: v for k, v in legacy.items() if k in _LEGACY_KWARGS and v is not None}
    if ignore_eos is not None and ignore_eos is not False:
        changes['ignore_eos'] = ignore_eos       # validated by ``replace``: True, or refused
    return config.replace(**changes) if changes else config


def single_token_id(tokenizer, word: str) -> int | None:
    ids = tokenizer.encode(word, add_bos=False)
    return ids[0] if len(ids) == 1 else None


def resolve_stops(config: GenerationConfig, template_stop_words: list[str], tokenizer,
                  eos_ids: list[int]) -> tuple[GenerationConfig, list[str]]:
    """Split stop words into engine stop ids and text stop strings; resolve bad words to ids."""
    stop_ids: list[int] = list(config.stop_token_ids or [])
    text_stops: list[str] = []
    for word in list(template_stop_words) + list(config.stop_words or []):
        token = single_token_id(tokenizer, word)
        if token is not None:
            stop_ids.append(token)
        text_stops.append(word)
    stop_ids.extend(eos_ids)
    bad_ids = list(config.bad_token_ids or [])
    for word in config.bad_words or []:
        bad_ids.extend(tokenizer.indexes_containing_token(word))
    if config.ignore_eos:  # LMDeploy: stop ids become bad ids, so generation runs to max_new_tokens
        bad_ids.extend(stop_ids)
        stop_ids, text_stops = [], []
    resolved = config.replace(stop_token_ids=sorted(set(stop_ids)) or None, bad_token_ids=sorted(set(bad_ids)) or None)
    return resolved, text_stops
