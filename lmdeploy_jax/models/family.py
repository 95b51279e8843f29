"""What a model family declares to join the engine (one module under ``families/``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .spec import ModelSpec
from .weight_map import Path, Source


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture's model.

    - ``model_class``: the ``nnx`` module (``layers.decoder.CausalLM`` or a subclass), built as
      ``model_class(spec, rngs=...)``.
    - ``weight_map(spec)``: its parameters' checkpoint tensors (``weight_map.py``).
    - ``sliding_window``: how config.json gives the attention windows (``spec.sliding_windows``):
      None (no window), ``'all_layers'`` (Mistral: ``sliding_window`` in every layer,
      ``layer_types`` ignored) or ``'per_layer'`` (Qwen2, Qwen3: ``sliding_window`` when
      ``use_sliding_window``, in the layers ``layer_types`` marks ``sliding_attention``, by default
      those from ``max_window_layers`` on).
    - ``qk_norm``: q and k are RMS-normed per head before the rotary embedding.
    - ``partial_rotary``: the transformers model rotates only the first ``rotary_dim`` dims of a
      head (``spec.rope_from_config``).
    - ``read_config(config)``: config.json's dict as the family's transformers config class reads
      it (its own defaults and legacy keys made explicit), before any field is parsed.
    - ``layer_type_ropes(config, path)``: for a family whose sliding-window layers rotate by a rope of
      their own (Gemma 3), each layer type's rope parameters (``{'full_attention': {...},
      'sliding_attention': {...}}``, as ``rope_parameters``); they give ``spec.rope`` and
      ``spec.local_rope``.
    - ``adjust_spec(spec, config, path)``: the spec with the family's own config fields read
      (CheckpointError naming ``path`` for a bad one), after the shared ones.
    """
    model_class: type
    weight_map: Callable[[ModelSpec], dict[Path, Source]]
    sliding_window: str | None = None
    qk_norm: bool = False
    partial_rotary: bool = False
    adjust_spec: Callable[[ModelSpec, dict, str], ModelSpec] | None = None
    layer_type_ropes: Callable[[dict, str], dict[str, dict]] | None = None
    read_config: Callable[[dict], dict] | None = None
