"""``load_model``: a checkpoint as a ``flax.nnx`` module and its tokenizer, for use without the
engine (notebooks, gradients, probing)."""
from __future__ import annotations


def load_model(model_path: str | None = None, dtype: str = 'float32'):
    """``(model, tokenizer)`` of ``model_path`` (a Hugging Face directory, a ``.gguf`` file or a hub
    id; None: the embedded default model), the model an ``nnx.Module`` of its family
    (``models.layers.decoder.CausalLM``) with the weights in ``dtype`` on the default device.
    ``model.token_logits(ids [B, T])`` gives float32 logits ``[B, T, vocab]``; ``nnx.split(model)``
    gives the parameters as a pytree for ``jax.grad``. Raises UnsupportedArchitectureError when the
    JAX engine has no model for the checkpoint, CheckpointError naming a broken file."""
    from .checkpoint.source import resolve_model
    from .models import load_model as load_engine_model
    from .tokenizer import Tokenizer
    source = resolve_model(model_path)
    model = load_engine_model(source, dtype).module()
    return model, Tokenizer(source.hf_dir)
