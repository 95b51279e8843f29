"""Tensor parallelism: the mesh, its partition rules, multi-host start-up, host-to-mesh placement."""
from .distributed import init_distributed
from .mesh import local_devices, make_tp_mesh
from .placement import agree_min, from_host
from .rules import HeadSplit, param_spec, split_heads

__all__ = ['HeadSplit', 'agree_min', 'from_host', 'init_distributed', 'local_devices', 'make_tp_mesh',
           'param_spec', 'split_heads']
