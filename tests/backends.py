"""The attention/noise backends every model test runs against (the fused ones once walt._C has them)."""
import pytest
import torch

import walt

FUSED_BUILT = hasattr(walt.ops, "window_attention")
FUSED_NOISE_BUILT = hasattr(walt.ops, "add_noise")

BACKENDS = [
    "torch",
    pytest.param("fused", marks=pytest.mark.skipif(not FUSED_BUILT, reason="fused ops not built")),
]
NOISE_BACKENDS = [
    "torch",
    pytest.param("fused", marks=pytest.mark.skipif(not FUSED_NOISE_BUILT, reason="fused ops not built")),
]


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one intra-op thread is as fast, and far steadier on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
