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
