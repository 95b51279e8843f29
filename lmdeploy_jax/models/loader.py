"""``load_model``: a resolved checkpoint directory -> spec, params on the device (or sharded over a
tensor-parallel mesh), pure step functions."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import Mesh

from pallas_kernels.reduce_add_rms_norm.api import prepare_kernel

from .. import settings
from ..checkpoint.source import ModelSource
from ..parallel import split_heads
from . import llama
from .kv_cache import init_kv_caches, kv_bytes_per_block
from .registry import UnsupportedArchitectureError, is_supported
from .rope import inv_frequencies
from .spec import DTYPES, ModelSpec, dynamic_ntk, spec_from_config
from .step_batch import StepBatch
from .safetensors_file import SafetensorsCheckpoint
from .weights import check_tensors, load_params

logger = logging.getLogger('lmdeploy_jax')


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to step. ``forward`` and ``compute_logits`` are pure (jit them; donate the KV
    list to ``forward``); ``params`` is a plain pytree, passed to them as an argument.

    With a ``mesh`` the params are sharded over it and ``spec.num_kv_heads`` counts the KV heads
    as stored (each repeated where the mesh is wider than the checkpoint's KV heads)."""
    spec: ModelSpec
    params: dict
    inv_freq: np.ndarray = field(repr=False)   # rope inverse frequencies, a compile-time constant
    mesh: Mesh | None = None
    layer_unroll: int | bool = 1               # layers per scan iteration (True: straight-line code)
    p2p_claim: object = field(default=None, repr=False)     # held while the kernel sums over these GPUs

    @property
    def p2p_all_reduce(self) -> bool:
        """Small tensor-parallel steps sum with the CUDA kernel (``row_parallel.py``)."""
        return self.p2p_claim is not None

    init_kv_caches = staticmethod(init_kv_caches)
    kv_bytes_per_block = staticmethod(kv_bytes_per_block)

    def forward(self, params: dict, kv_caches: llama.KVCache, batch: StepBatch) -> tuple[jax.Array, llama.KVCache]:
        """``(hidden [B, T, hidden_size], kv_caches)``: attention by the decode op when T == 1."""
        return llama.forward(self.spec, self.inv_freq, params, kv_caches, batch, self.mesh, self.layer_unroll,
                             self.p2p_all_reduce)

    def compute_logits(self, params: dict, hidden: jax.Array) -> jax.Array:
        """float32 ``[..., vocab]``."""
        return llama.compute_logits(params, hidden)


def _resolve_dtype(dtype: str, config: dict, ckpt: SafetensorsCheckpoint) -> str:
    """'auto' is the checkpoint's declared dtype, else the stored dtype of its embedding."""
    if dtype != 'auto':
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return dtype
    declared = config.get('dtype') or config.get('torch_dtype')
    return declared if declared in DTYPES else ckpt.dtype_name('model.embed_tokens.weight')


def model_spec(source: ModelSource, ckpt: SafetensorsCheckpoint, dtype: str = 'auto') -> ModelSpec:
    """The spec of ``source``'s config; CheckpointError naming config.json when a field is missing or bad."""
    config = source.config_dict()
    return spec_from_config(config, source.architecture, DTYPES[_resolve_dtype(dtype, config, ckpt)],
                            source.generation_eos_ids(), source.config_path)


def check_checkpoint(source: ModelSource) -> None:
    """What ``load_model`` would refuse in ``source``'s files, found from their headers alone (no
    weight is read): a corrupt or truncated safetensors file, a bad config, a tensor missing or of
    another shape than the config implies. Raises CheckpointError naming the file."""
    with SafetensorsCheckpoint(source.hf_dir) as ckpt:
        check_tensors(ckpt, model_spec(source, ckpt), source.config_path)


def load_model(source: ModelSource, dtype: str = 'auto', mesh: Mesh | None = None,
               rope_scaling_factor: float = 0.0) -> LoadedModel:
    """Load ``source``'s weights for the JAX engine, sharded over ``mesh`` if given; raises
    UnsupportedArchitectureError first when its architecture has no JAX model, CheckpointError
    naming the file when the files are broken or disagree with the config, ValueError when the
    mesh cannot split its heads. ``rope_scaling_factor``: ``TurbomindEngineConfig``'s (not 0: dynamic
    NTK rope, ``spec.dynamic_ntk``)."""
    architecture = source.architecture
    if not is_supported(architecture):
        raise UnsupportedArchitectureError(architecture)
    with SafetensorsCheckpoint(source.hf_dir) as ckpt:
        spec = model_spec(source, ckpt, dtype)
        if rope_scaling_factor:
            spec = dataclasses.replace(spec, rope=dynamic_ntk(spec.rope, rope_scaling_factor,
                                                              spec.max_position_embeddings))
        check_tensors(ckpt, spec, source.config_path)
        split = None
        if mesh is not None:
            split = split_heads(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, mesh.size)
        params = load_params(ckpt, spec, mesh, split)
    if split is not None:
        spec = dataclasses.replace(spec, num_kv_heads=split.stored_kv_heads)
    return LoadedModel(spec, params, inv_frequencies(spec.rope, spec.head_dim), mesh,
                       settings.current().layer_unroll, _prepare_p2p_all_reduce(mesh) if mesh is not None else None)


def _prepare_p2p_all_reduce(mesh: Mesh):
    """Ready the ``reduce_add_rms_norm`` CUDA kernel for a mesh of GPUs unless
    ``LMDEPLOY_JAX_P2P_ALL_REDUCE=0``: its claim on the GPUs, or None; says in the log what small
    tensor-parallel steps sum with."""
    devices = list(mesh.devices.flat)
    if devices[0].platform != 'gpu' or not settings.current().p2p_all_reduce:
        return None
    claim = prepare_kernel(devices)
    if isinstance(claim, str):
        logger.warning("small tensor-parallel steps use XLA's all-reduce: %s", claim)
        return None
    logger.info('small tensor-parallel steps sum over peer memory (reduce_add_rms_norm CUDA kernel)')
    return claim
