"""Fixtures shared by the test modules."""
import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """Fresh random inputs each run, reproducible: the seed is printed and kept in the report."""
    seed = np.random.SeedSequence().entropy
    request.node.user_properties.append(('seed', seed))
    print(f'rng seed {seed}')
    return np.random.default_rng(seed)


@pytest.fixture(scope='module')
def default_model_pipeline():
    """A JAX-engine pipeline over the default model, one per module that asks for it: every setting
    at its default but ``session_len``, which is the server tests' (``test_server.SESSION_LEN``).
    Every step attends over a whole session's block table, so the CPU default of 8192 tokens makes
    each call several times slower; the server tests' length also gives their compiled steps, which
    the JAX compilation cache then holds for every such module."""
    from test_server import SESSION_LEN

    from lmdeploy_jax import TurbomindEngineConfig, pipeline
    with pipeline(backend_config=TurbomindEngineConfig(session_len=SESSION_LEN)) as p:
        yield p
