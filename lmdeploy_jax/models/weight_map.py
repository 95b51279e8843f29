"""A family's declarative weight map: which checkpoint tensors fill each parameter of its ``nnx``
model, keyed by the parameter's path in the model's state (``('layers', 'attn', 'qkv', 'w')``).

A name with ``{i}`` is read once per layer into a parameter stacked over the layers; one without is
read whole. A fused parameter (``layers.fused.FUSED``: ``qkv``, ``gate_up``) lists one ``Part`` per
logical part, each naming where that part's rows are in the checkpoint: a tensor of its own
(Llama's ``q_proj``), a row range of a packed tensor (Phi-3's ``qkv_proj``), or rows scattered
through one (InternLM2's grouped ``wqkv``). The loader (``weights.py``) lays the parts out shard by
shard for tensor parallelism.

A mixture of experts' expert weights are stacked over the experts too (``[layers, experts, ...]``)
from one tensor per expert and layer, as published checkpoints store them: ``Experts`` wraps a
``Tensor`` or ``Fused`` source whose names have ``{e}`` as well as ``{i}``.

A map may name a bias (``.../b``) the checkpoint lacks: the model has a bias exactly where the
checkpoint does (``ModelSpec.biases``, found by ``biases_present``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Path = tuple[str, ...]


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor (per layer where ``name`` has ``{i}``), its values plus ``add`` (Gemma's
    norms multiply by ``1 + w`` and store ``w``: the model stores ``1 + w``)."""
    name: str
    add: float = 0.0


@dataclass(frozen=True)
class Part:
    """Where one logical part of a fused parameter lives, per layer (``name`` has ``{i}``): logical
    row ``r`` is row ``rows[r]`` of the tensor (``rows`` None: row ``r``). ``tensor_rows``: the
    tensor's row count when it packs several parts (None: the part's own)."""
    name: str
    rows: np.ndarray | None = field(default=None, compare=False)
    tensor_rows: int | None = None

    def read(self, view: np.ndarray, start: int, stop: int, rest: tuple[slice, ...]) -> np.ndarray:
        """Logical rows ``[start, stop)`` (columns ``rest``) from the tensor's ``view``."""
        if self.rows is None:
            return view[(slice(start, stop), *rest)]
        rows = self.rows[start:stop]
        if stop - start and rows[-1] - rows[0] == stop - start - 1 and np.all(np.diff(rows) == 1):
            return view[(slice(int(rows[0]), int(rows[-1]) + 1), *rest)]
        return view[(rows, *rest)]


@dataclass(frozen=True)
class Fused:
    """The parts of a fused parameter, in ``layers.fused.FUSED`` order."""
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Experts:
    """``count`` experts' tensors stacked in expert order: expert ``e``'s is ``source`` with ``{e}``
    in its names replaced by ``e`` (``expert(e)``)."""
    source: Tensor | Fused
    count: int

    def expert(self, e: int) -> Tensor | Fused:
        if isinstance(self.source, Tensor):
            return Tensor(self.source.name.replace('{e}', str(e)), self.source.add)
        return Fused(tuple(Part(p.name.replace('{e}', str(e)), p.rows, p.tensor_rows) for p in self.source.parts))


@dataclass(frozen=True)
class Quantized:
    """One device array (``leaf``: 'qweight', 'scales' or 'zeros') of a 4-bit linear of an AWQ/GPTQ
    checkpoint (``method``), read from the tensors of the module(s) ``source`` names by their float
    ``<module>.weight`` (``layers.quantized_linear``; ``checkpoint.quantization.device_array``)."""
    source: Tensor | Fused
    leaf: str
    method: str


Source = Tensor | Fused | Experts | Quantized


def linear(path: Path, source: str | tuple[str, ...] | tuple[Part, ...]) -> dict[Path, Source]:
    """The ``w`` and ``b`` entries of the ``Linear`` at ``path`` from Hugging Face modules: one
    module name (``'model.layers.{i}.self_attn.o_proj'``), or one per fused part, or ``Part``\\ s
    naming the ``.weight`` tensors (their ``.bias`` tensors are read the same way)."""
    if isinstance(source, str):
        return {(*path, 'w'): Tensor(f'{source}.weight'), (*path, 'b'): Tensor(f'{source}.bias')}
    parts = tuple(Part(p) if isinstance(p, str) else p for p in source)
    return {(*path, leaf): Fused(tuple(_with_suffix(p, suffix) for p in parts))
            for leaf, suffix in (('w', '.weight'), ('b', '.bias'))}


def packed_parts(name: str, sizes: tuple[int, ...]) -> tuple[Part, ...]:
    """One ``Part`` per consecutive row range of ``sizes`` in the packed tensor ``name`` (Phi-3's
    ``qkv_proj``, a ``gate_up_proj``)."""
    starts = np.cumsum((0, *sizes))
    return tuple(Part(name, np.arange(start, start + n), int(starts[-1])) for start, n in zip(starts, sizes))


def _with_suffix(part: Part, suffix: str) -> Part:
    name = part.name if part.name.endswith('.weight') else part.name + '.weight'
    return Part(name[:-len('.weight')] + suffix, part.rows, part.tensor_rows)


def module_name(weight_name: str) -> str:
    """``'model.layers.{i}.self_attn.o_proj'`` of ``'model.layers.{i}.self_attn.o_proj.weight'``: a
    quantized linear's tensors are named after its module."""
    if not weight_name.endswith('.weight'):
        raise ValueError(f'a quantized linear is read from <module>.weight entries, got {weight_name!r}')
    return weight_name[:-len('.weight')]


def first_tensor(source: Source, layer: int = 0) -> str:
    """The checkpoint name of ``source``'s first tensor in layer ``layer``."""
    if isinstance(source, Quantized):
        source = source.source
    name = source.parts[0].name if isinstance(source, Fused) else source.name
    return name.format(i=layer)


def biases_present(weight_map: dict[Path, Source], contains) -> frozenset[str]:
    """The names of the linears (``path[-2]``: 'qkv', 'o', ...) whose bias the checkpoint holds
    (``contains(name)``), judged by layer 0."""
    return frozenset(path[-2] for path, source in weight_map.items()
                     if path[-1] == 'b' and contains(first_tensor(source)))
