"""RMSNorm: the Pallas kernel against its reference, each call normalising the previous call's
output (``TIMER``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.rms_norm import pallas_gpu as norm_gpu
from pallas_kernels.rms_norm.api import rms_norm

from ._common import CHECK_ROWS, op_impls

SWEEP = {'tile_elems': [1024, 4096, 16384], 'num_warps': [2, 4, 8, 16]}
SWEEPS = (SWEEP,)
EPS = 1e-5
TIMER = 'chained'
ROWS = True         # cases from --tokens (rows per call), not batches x contexts


def impls(args):
    return op_impls(args, functools.partial(rms_norm, eps=EPS, impl='reference'), _pallas_norm,
                    norm_gpu.NormConfig, SWEEP)


def _pallas_norm(x, weight, *, config, interpret):
    return norm_gpu.rms_norm_pallas(x, weight[None], jnp.int32(0), EPS, config=config, interpret=interpret)


def row_width(args) -> int:
    return args.hidden or args.heads * args.head_dim


def make_case(args, rows, _context, seed):
    """``rows`` random rows of ``row_width`` and a random weight around 1, both of ``--dtype``;
    bytes: the rows read and written, the weight read. Each timed call normalises the previous
    call's output, as a layer's norm reads what the layer before it wrote."""
    hidden, itemsize = row_width(args), jnp.dtype(args.dtype).itemsize
    key_x, key_w = jax.random.split(jax.random.key(seed))
    weight = 1 + jax.random.normal(key_w, (hidden,), args.dtype) / 2
    return {'x': jax.random.normal(key_x, (rows, hidden), args.dtype), 'weight': weight,
            'bytes': (2 * rows + 1) * hidden * itemsize, 'flops': 0}


def call(fn, case):
    return fn(case['x'], case['weight'])


def check_rows(fn, case):
    return fn(case['x'][:CHECK_ROWS], case['weight'])
