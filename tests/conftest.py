import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """Fresh random inputs per run, with the seed printed on failure."""
    seed = np.random.SeedSequence().entropy % 2**32
    request.node.user_properties.append(("seed", seed))
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)
