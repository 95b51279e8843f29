"""A pipeline call's ``n > 1``: each prompt's ``n`` answers run as independent requests.

Every answer of a call has an index: the answers of prompt ``i`` follow those of the prompts
before it, so with ``n == 1`` everywhere an answer's index is its prompt's (LMDeploy's
``Response.index``), and with ``n == k`` prompt ``i``'s j-th answer is ``i * k + j`` (the
server's choice numbering).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..messages import GenerationConfig, Response

_SEED_MODULUS = 2 ** 64


@dataclass(frozen=True)
class Sample:
    """One answer to produce: prompt ``prompt_index``'s, numbered ``index`` in the call."""
    prompt_index: int
    index: int
    prompt: object
    config: GenerationConfig      # n == 1


def sample_config(config: GenerationConfig, j: int) -> GenerationConfig:
    """The j-th answer's settings: one answer, seeded ``random_seed + j`` (within 64 bits) when seeded,
    so answers differ yet a seeded call repeats; unseeded ones draw a fresh seed each."""
    seed = config.random_seed
    if seed is not None and j:
        seed = (seed + j) % _SEED_MODULUS
    return config.replace(n=1, random_seed=seed)


def fan_out(prompts: list, configs: list[GenerationConfig]) -> list[Sample]:
    """The answers a call produces, in index order."""
    samples: list[Sample] = []
    for i, (prompt, config) in enumerate(zip(prompts, configs)):
        samples += [Sample(i, len(samples) + j, prompt, sample_config(config, j)) for j in range(config.n)]
    return samples


def group(responses: list[Response], configs: list[GenerationConfig]) -> list[Response | list[Response]]:
    """Per prompt: its ``Response`` when its ``n`` is 1, else the list of its ``n`` (``responses``
    in index order)."""
    out, start = [], 0
    for config in configs:
        answers = responses[start:start + config.n]
        out.append(answers[0] if config.n == 1 else answers)
        start += config.n
    return out
