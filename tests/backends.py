"""The attention/noise backends every model test runs against (the fused ones once walt._C has them)."""
import pytest

import walt

FUSED_BUILT = hasattr(walt.ops, "window_attention")
FUSED_NOISE_BUILT = hasattr(walt.ops, "add_noise")

BACKENDS = [
    "reference",
    pytest.param("fused", marks=pytest.mark.skipif(not FUSED_BUILT, reason="fused ops not built")),
]
NOISE_BACKENDS = [
    "reference",
    pytest.param("fused", marks=pytest.mark.skipif(not FUSED_NOISE_BUILT, reason="fused ops not built")),
]
