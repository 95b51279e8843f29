"""``load_model``: a checkpoint as a ``flax.nnx`` module and its tokenizer, for use without the
engine (notebooks, gradients, probing); ``logit_lens`` and ``input_embedding_grad`` on such a
module."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .parallel.rules import ROW_PARALLEL


def load_model(model_path: str | None = None, dtype: str = 'float32'):
    """``(model, tokenizer)`` of ``model_path`` (a Hugging Face directory, a ``.gguf`` file, a hub
    id or an engine checkpoint; None: the embedded default model), the model an ``nnx.Module`` of
    its family (``models.layers.decoder.CausalLM``) with the weights in ``dtype`` on the default
    device. ``model.token_logits(ids [B, T])`` gives float32 logits ``[B, T, vocab]``;
    ``nnx.split(model)`` gives the parameters as a pytree for ``jax.grad``. Raises
    UnsupportedArchitectureError when the JAX engine has no model for the checkpoint,
    CheckpointError naming a broken file."""
    from .checkpoint.source import resolve_model
    from .models import load_model as load_engine_model
    from .tokenizer import Tokenizer
    source = resolve_model(model_path)
    model = load_engine_model(source, dtype).module()
    return model, Tokenizer(source.hf_dir)


def _writes_to_residual(path) -> bool:
    """Whether the state entry at ``path`` (``tree_map_with_path``'s keys) belongs to a layer's
    projection into the residual stream (attention's o, the MLP's down, an expert's or a shared
    expert's down: the row-parallel ones)."""
    names = [getattr(key, 'key', None) for key in path]
    return names[0] == 'layers' and any(name in ROW_PARALLEL for name in names)


def logit_lens(model: nnx.Module, token_ids: jax.Array) -> jax.Array:
    """The logit lens: float32 ``[layers + 1, B, T, vocab]``, entry ``k`` the logits that the final
    norm and the output head give from the residual stream after the first ``k`` layers of
    ``model`` (0: the embeddings alone; ``layers``: ``model.token_logits(token_ids)``), at every
    position of ``token_ids [B, T]``. Exact: depth ``k`` is the model with the later layers'
    writes into the residual stream (their row-parallel projections) zeroed, so those layers pass
    the stream through unchanged. Raises ValueError when ``token_ids`` is not an integer matrix."""
    graph, state = nnx.split(model)
    num_layers = model.spec.num_layers

    @jax.jit
    def at_depth(state, depth):
        kept = jnp.arange(num_layers) < depth

        def truncate(path, x):
            return jnp.where(kept.reshape(-1, *[1] * (x.ndim - 1)), x, 0) if _writes_to_residual(path) else x
        return nnx.merge(graph, jax.tree_util.tree_map_with_path(truncate, state)).token_logits(token_ids)

    token_ids = jnp.asarray(token_ids)
    return jnp.stack([at_depth(state, depth) for depth in range(num_layers + 1)])


def input_embedding_grad(model: nnx.Module, token_ids: jax.Array,
                         loss: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(loss(logits), its gradient)`` with respect to the embedding row each position of
    ``token_ids [B, T]`` reads, float32 ``[B, T, hidden]``: ``loss`` maps the float32 logits
    ``[B, T, vocab]`` to a scalar. A token that occurs twice gets one gradient per occurrence, and
    a tied output head's use of the table is not counted: the rows read are copies appended to the
    table, one per position, that the output head's vocabulary leaves out. Input-token saliency is
    the gradient's norm over ``hidden``. Raises ValueError when ``token_ids`` is not an integer
    matrix."""
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise ValueError(f'token_ids must be an integer array [batch, tokens], got {token_ids.dtype} '
                         f'{tuple(token_ids.shape)}')
    graph, state = nnx.split(model)
    table = state['embed'][...]
    vocab, (batch, length) = table.shape[0], token_ids.shape
    position_ids = vocab + jnp.arange(batch * length, dtype=jnp.int32).reshape(batch, length)

    def loss_of_rows(rows):
        extended = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.concatenate([x, rows]) if getattr(path[0], 'key', None) == 'embed' else x, state)
        return loss(nnx.merge(graph, extended).token_logits(position_ids)[..., :vocab])

    value, grad = jax.jit(jax.value_and_grad(loss_of_rows))(table[token_ids.reshape(-1)])
    return value, grad.astype(jnp.float32).reshape(batch, length, -1)
