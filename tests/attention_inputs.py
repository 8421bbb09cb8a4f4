"""Window-attention test inputs and helpers shared by the fused-kernel and composite tests."""
import torch


def make_inputs(shape, dtype=torch.float32, layout="fused", bias=False, window=None, seed=0):
    """q, k, v (and a bias table) of `shape` = (B, T, H, W, heads, d) in one of three layouts:
    "fused": views of one (B, T, H, W, 3, heads, d) qkv tensor, as a transformer block makes them;
    "contiguous": three separate tensors; "strided": heads-first storage permuted to heads-last and
    padded on d, so every stride but d's is unusual."""
    g = torch.Generator().manual_seed(seed)
    B, T, H, W, heads, d = shape
    if layout == "fused":
        q, k, v = torch.randn(B, T, H, W, 3, heads, d, generator=g).to(dtype).unbind(4)
    elif layout == "contiguous":
        q, k, v = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    elif layout == "strided":
        q, k, v = (
            torch.randn(B, heads, T, H, W, d + 3, generator=g).to(dtype)[..., :d].permute(0, 2, 3, 4, 1, 5)
            for _ in range(3)
        )
    else:
        raise AssertionError(layout)
    table = None
    if bias:
        table = torch.randn(heads, *(2 * w - 1 for w in window), generator=g).to(dtype)
    return q, k, v, table


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def case_id(c):
    shape, window, bias, layout = c
    return f"{'x'.join(map(str, shape))}-w{''.join(map(str, window))}-{'bias' if bias else 'nobias'}-{layout}"
