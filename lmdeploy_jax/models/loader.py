"""``load_model``: a resolved checkpoint directory -> its family's ``nnx`` model with the weights on
the device (or sharded over a tensor-parallel mesh), split into a graph and a state so the engine's
compiled steps take the parameters as an argument."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax.sharding import Mesh

from pallas_kernels.reduce_add_rms_norm.api import prepare_kernel

from ..checkpoint.source import ModelSource
from ..parallel import HeadSplit, split_heads
from ..parallel.rules import splits_by_expert
from .kv_cache import init_kv_caches, kv_bytes_per_block
from .layers.attention import KVCache
from .layers.decoder import rope_inv_frequencies
from .layers.fused import FusedLayout
from .layers.quantized_linear import check_tensor_parallel, quantized_weight_map
from .registry import checkpoint_quantization, family
from .restore import checkpoint_spec, restore_params
from .safetensors_file import SafetensorsCheckpoint
from .spec import DTYPES, ModelSpec, dynamic_ntk, spec_from_config
from .step_batch import StepBatch
from .weight_map import biases_present
from .weights import check_tensors, expected_shapes, load_state

logger = logging.getLogger('lmdeploy_jax')


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to step. ``graphdef`` and ``params`` are ``nnx.split`` of the model:
    ``forward`` and ``compute_logits`` merge them (pure: jit them; donate the KV caches to
    ``forward``), so ``params`` (an ``nnx.State``, a pytree) is an argument of a compiled step.

    With a ``mesh`` the params are sharded over it and ``spec.num_kv_heads`` counts the KV heads
    as stored (each repeated where the mesh is wider than the checkpoint's KV heads)."""
    spec: ModelSpec
    graphdef: nnx.GraphDef = field(repr=False)
    params: nnx.State = field(repr=False)
    mesh: Mesh | None = None
    layer_unroll: int | bool = 1               # layers per loop iteration (True: straight-line code)
    p2p_claim: object = field(default=None, repr=False)     # held while the kernel sums over these GPUs
    kv_replicas: int = 1                       # copies stored of each checkpoint KV head (tp > KV heads)

    @property
    def p2p_all_reduce(self) -> bool:
        """Small tensor-parallel steps sum with the CUDA kernel (``row_parallel.py``)."""
        return self.p2p_claim is not None

    @property
    def inv_freq(self) -> np.ndarray:
        """The rope inverse frequencies the compiled steps bake in as constants."""
        return rope_inv_frequencies(self.spec)

    init_kv_caches = staticmethod(init_kv_caches)
    kv_bytes_per_block = staticmethod(kv_bytes_per_block)

    def module(self, params: nnx.State | None = None) -> nnx.Module:
        """The ``nnx`` model over ``params`` (default: the loaded ones)."""
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def forward(self, params: nnx.State, kv_caches: KVCache, batch: StepBatch) -> tuple:
        """``(hidden [B, T, hidden_size], kv_caches)``: attention by the decode op when T == 1."""
        return self.module(params)(kv_caches, batch, self.mesh, self.layer_unroll, self.p2p_all_reduce)

    def compute_logits(self, params: nnx.State, hidden: jax.Array) -> jax.Array:
        """float32 ``[..., vocab]``."""
        return self.module(params).logits(hidden)


def _resolve_dtype(dtype: str, config: dict, ckpt: SafetensorsCheckpoint, embed_name: str) -> str:
    """'auto' is the checkpoint's declared dtype, else the stored dtype of its embedding."""
    if dtype != 'auto':
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return dtype
    declared = config.get('dtype') or config.get('torch_dtype')
    return declared if declared in DTYPES else ckpt.dtype_name(embed_name)


def model_spec(source: ModelSource, ckpt: SafetensorsCheckpoint, dtype: str = 'auto') -> ModelSpec:
    """The spec of ``source``'s config and checkpoint (its biases: where the checkpoint has them);
    CheckpointError naming config.json when a field is missing or bad, UnsupportedArchitectureError
    when the JAX engine has no model for it; with 4-bit weights (``spec.quantization``),
    UnsupportedQuantizationError for a method or setting the engine does not run and ValueError
    when a projection's inputs are not whole packed tiles and groups."""
    config, fam = source.config_dict(), family(source.architecture)
    spec = spec_from_config(config, fam, source.architecture, DTYPES['float32'], source.generation_eos_ids(),
                            source.config_path)
    weight_map = fam.weight_map(spec)
    embed_name = weight_map[('embed',)].name
    spec = dataclasses.replace(spec, dtype=jnp.dtype(DTYPES[_resolve_dtype(dtype, config, ckpt, embed_name)]),
                               biases=biases_present(weight_map, ckpt.__contains__),
                               quantization=checkpoint_quantization(source.architecture, source.config_path, config))
    check_tensor_parallel(spec)
    return spec


def abstract_params(spec: ModelSpec) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and the parameters' shapes and dtypes (no memory) of ``spec``'s model."""
    model = nnx.eval_shape(lambda: family(spec.architecture).model_class(spec, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def flat_state(state: nnx.State) -> dict:
    """``state``'s leaves by state path (``('layers', 'attn', 'qkv', 'w')``)."""
    return traversals.flatten_mapping(nnx.to_pure_dict(state))


def _weight_map(spec: ModelSpec, params: dict):
    """The family's weight map of ``spec``, that of the 4-bit linears of a quantized checkpoint
    (``quantized_weight_map``) where ``params`` (by state path) has them."""
    weight_map = family(spec.architecture).weight_map(spec)
    return weight_map if spec.quantization is None else quantized_weight_map(spec, weight_map, params)


def _expected_shapes(spec: ModelSpec, abstract: nnx.State) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors (name -> shape) the parameters ``abstract`` of ``spec``'s model read."""
    params = flat_state(abstract)
    return expected_shapes(spec, _weight_map(spec, params), params)


def check_checkpoint(source: ModelSource) -> None:
    """What ``load_model`` would refuse in ``source``'s files, found from their headers alone (no
    weight is read): a corrupt or truncated safetensors file, a bad config, a tensor missing or of
    another shape than the config implies. Raises CheckpointError naming the file."""
    if source.is_engine_checkpoint:      # written by `lmdeploy_jax convert`: its metadata (restore.py)
        checkpoint_spec(source)
        return
    with SafetensorsCheckpoint(source.hf_dir) as ckpt:
        spec = model_spec(source, ckpt)
        check_tensors(ckpt, _expected_shapes(spec, abstract_params(spec)[1]), source.config_path)


def split_for_mesh(spec: ModelSpec, mesh: Mesh | None) -> HeadSplit | None:
    """How ``mesh``'s devices share ``spec``'s heads and MLPs (None without a mesh); ValueError
    naming the numbers when they cannot split them evenly."""
    if mesh is None:
        return None
    split = split_heads(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, mesh.size)
    if spec.shared_expert_size % mesh.size:
        raise ValueError(f'tp={mesh.size} cannot split the shared expert size {spec.shared_expert_size} evenly')
    check_tensor_parallel(spec, mesh.size)
    return split


def with_expert_split(spec: ModelSpec, mesh: Mesh | None, ep: int) -> ModelSpec:
    """``spec`` with ``expert_parallel`` set where ``ep`` (``TurbomindEngineConfig``'s) splits its
    experts whole over ``mesh``'s devices; ValueError naming ``ep`` where it cannot
    (``parallel.rules.splits_by_expert``)."""
    whole = splits_by_expert(ep, mesh.size if mesh is not None else 1, spec.num_experts)
    return dataclasses.replace(spec, expert_parallel=whole)


def load_model(source: ModelSource, dtype: str = 'auto', mesh: Mesh | None = None,
               rope_scaling_factor: float = 0.0, p2p_all_reduce: bool = True, ep: int = 1) -> LoadedModel:
    """Load ``source``'s weights for the JAX engine, sharded over ``mesh`` if given; raises
    UnsupportedArchitectureError first when its architecture has no JAX model,
    UnsupportedQuantizationError naming the method of a quantized checkpoint other than 4-bit
    AWQ/GPTQ (or the setting of one it cannot run, or the architecture of a 4-bit mixture of
    experts), CheckpointError naming the file when the files are broken or disagree with the config, ValueError when the
    mesh cannot split its heads. ``rope_scaling_factor``: ``TurbomindEngineConfig``'s (not 0: dynamic
    NTK rope, ``spec.dynamic_ntk``). ``p2p_all_reduce``: small tensor-parallel steps on a mesh of GPUs
    sum with the ``reduce_add_rms_norm`` CUDA kernel where it can be prepared
    (``TurbomindEngineConfig.communicator == 'cuda-ipc'``), else with XLA's all-reduce. ``ep``:
    ``TurbomindEngineConfig``'s; equal to the mesh's size, each device holds whole experts
    (``with_expert_split``; ValueError naming ``ep`` where the model cannot take it)."""
    family(source.architecture)      # UnsupportedArchitectureError before anything is read
    checkpoint_quantization(source.architecture, source.config_path, source.config_dict())
    if source.is_engine_checkpoint:      # written by `lmdeploy_jax convert`: restored by Orbax (restore.py)
        stored, graphdef, params, kv_replicas = restore_params(source, dtype, mesh, rope_scaling_factor, ep)
    else:
        stored, graphdef, params, kv_replicas = _load_safetensors(source, dtype, mesh, rope_scaling_factor, ep)
    claim = _prepare_p2p_all_reduce(mesh) if mesh is not None and p2p_all_reduce else None
    return LoadedModel(stored, graphdef, params, mesh, p2p_claim=claim, kv_replicas=kv_replicas)


def _load_safetensors(source: ModelSource, dtype: str, mesh: Mesh | None, rope_scaling_factor: float,
                      ep: int) -> tuple[ModelSpec, nnx.GraphDef, nnx.State, int]:
    """``load_model`` of a Hugging Face directory: the spec as stored, the graph, the loaded state
    and the copies stored of each KV head."""
    with SafetensorsCheckpoint(source.hf_dir) as ckpt:
        spec = with_expert_split(model_spec(source, ckpt, dtype), mesh, ep)
        if rope_scaling_factor:
            spec = dataclasses.replace(spec, rope=dynamic_ntk(spec.rope, rope_scaling_factor,
                                                              spec.max_position_embeddings))
        graphdef, abstract = abstract_params(spec)
        check_tensors(ckpt, _expected_shapes(spec, abstract), source.config_path)
        split = split_for_mesh(spec, mesh)
        layout = FusedLayout(spec) if split is None else FusedLayout(spec, split.tp, split.kv_replicas)
        stored = dataclasses.replace(spec, num_kv_heads=layout.stored_kv_heads)
        if stored != spec:       # KV heads repeated over a mesh wider than them
            graphdef, abstract = abstract_params(stored)
        params = flat_state(abstract)
        flat = load_state(ckpt, _weight_map(spec, params), params, layout, mesh)
    nnx.replace_by_pure_dict(abstract, traversals.unflatten_mapping(flat))
    return stored, graphdef, abstract, layout.kv_replicas


def _prepare_p2p_all_reduce(mesh: Mesh):
    """Ready the ``reduce_add_rms_norm`` CUDA kernel for a mesh of GPUs: its claim on the GPUs, or
    None; says in the log what small tensor-parallel steps sum with."""
    devices = list(mesh.devices.flat)
    if devices[0].platform != 'gpu':
        return None
    claim = prepare_kernel(devices)
    if isinstance(claim, str):
        logger.warning("small tensor-parallel steps use XLA's all-reduce: %s", claim)
        return None
    logger.info('small tensor-parallel steps sum over peer memory (reduce_add_rms_norm CUDA kernel)')
    return claim
