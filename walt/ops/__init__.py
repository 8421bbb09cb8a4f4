"""Python face of torch.ops.walt: autograd formulas, fake (meta) kernels and argument checks.

`reference` holds the pure-PyTorch oracles that define what each op computes.
"""
from walt.ops.noise import add_noise  # noqa: F401
from walt.ops.window_attention import window_attention  # noqa: F401
