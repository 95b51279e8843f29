"""Refusals of LMDeploy arguments this library does not implement, so none is silently dropped.

Each refusal names the argument and says what to do instead. ``TypeError`` for a keyword no
signature here takes (as Python raises for a misspelt one), ``ValueError`` for a known LMDeploy
argument given a value whose effect we do not implement.
"""
from __future__ import annotations


def refuse_unknown_keywords(where: str, kwargs: dict, allowed: str = '') -> None:
    """``TypeError`` naming every keyword of ``kwargs`` (the ones ``where`` does not take)."""
    if kwargs:
        names = ', '.join(repr(k) for k in sorted(kwargs))
        raise TypeError(f'{where}() got unexpected keyword argument(s) {names}' + (f'; {allowed}' if allowed else ''))


def refuse_adapter(adapter_name) -> None:
    """LMDeploy's ``adapter_name`` picks a LoRA adapter loaded with the engine; we load none."""
    if adapter_name is not None:
        raise ValueError(f'adapter_name={adapter_name!r}: LoRA adapters are not supported by lmdeploy_jax; '
                         'merge the adapter into the weights and load the merged model, or pass adapter_name=None')


def refuse_pipeline_arguments(speculative_config, allowed_media_domains, max_log_len, trust_remote_code) -> None:
    """Check ``pipeline()``'s LMDeploy arguments that select features we lack.

    ``trust_remote_code`` is taken (a bool) and passed to the tokenizer, the only place that
    could run a model repository's code (the JAX engine's models are ours, the pytorch backend
    loads transformers' own classes). ``max_log_len`` bounds how much of a prompt is logged:
    prompts are never logged here, so any bound holds; it is validated and has nothing to cut.
    """
    if speculative_config is not None:
        raise ValueError('speculative_config: speculative decoding is not supported by lmdeploy_jax; '
                         'pass speculative_config=None')
    if allowed_media_domains is not None:
        raise ValueError('allowed_media_domains: lmdeploy_jax serves text models only (no image or video '
                         'inputs to fetch); pass allowed_media_domains=None')
    if max_log_len is not None and (isinstance(max_log_len, bool) or not isinstance(max_log_len, int)
                                    or max_log_len < 0):
        raise ValueError(f'max_log_len must be an integer >= 0 or None, got {max_log_len!r}')
    if not isinstance(trust_remote_code, bool):
        raise ValueError(f'trust_remote_code must be True or False, got {trust_remote_code!r}')
