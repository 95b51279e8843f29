"""The residual add and RMSNorm in one op: the Pallas kernel against its reference, chained as
``rms_norm``'s."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.rms_norm import pallas_gpu as norm_gpu
from pallas_kernels.rms_norm.api import add_rms_norm

from ._common import CHECK_ROWS, op_impls
from .rms_norm import EPS, SWEEP, SWEEPS, row_width  # noqa: F401 - the same launch knobs and rows
from .rms_norm import make_case as norm_case

TIMER = 'chained'
ROWS = True


def impls(args):
    return op_impls(args, functools.partial(add_rms_norm, eps=EPS, impl='reference'), _pallas_add_norm,
                    norm_gpu.NormConfig, SWEEP)


def _pallas_add_norm(x, residual, weight, *, config, interpret):
    return norm_gpu.rms_norm_pallas(x, weight[None], jnp.int32(0), EPS, config=config, interpret=interpret,
                                    residual=residual)


def make_case(args, rows, context, seed):
    """``rms_norm.make_case`` plus a random residual; bytes: x and the residual read, the sum and the norm
    written, the weight read."""
    case = norm_case(args, rows, context, seed)
    case['residual'] = jax.random.normal(jax.random.key(seed + 1), case['x'].shape, args.dtype)
    case['bytes'] = (4 * rows + 1) * row_width(args) * jnp.dtype(args.dtype).itemsize
    return case


def call(fn, case):
    """The norm only: what a chained call feeds the next (the sum is written all the same)."""
    return fn(case['x'], case['residual'], case['weight'])[1]


def check_rows(fn, case):
    total, normed = fn(case['x'][:CHECK_ROWS], case['residual'][:CHECK_ROWS], case['weight'])
    return jnp.concatenate([total.reshape(-1), normed.reshape(-1)])
