"""walt.heap: inside reused_heap glibc maps no block of its own; outside, its defaults are back."""
import ctypes

import pytest
import torch

from walt.heap import _glibc, reused_heap


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def test_large_tensors_stay_in_the_heap_inside_and_malloc_is_restored_after():
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc >= 2.33 only (mallinfo2)")
    libc.mallinfo2.restype = _MallInfo2

    def mapped_while_held(nbytes=64 << 20):
        x = torch.empty(nbytes // 4)
        x.fill_(1.0)
        mapped = libc.mallinfo2().hblkhd
        del x
        return mapped

    base = libc.mallinfo2().hblkhd
    assert mapped_while_held() >= base + (64 << 20)  # glibc maps a 64 MiB block of its own
    with reused_heap(), reused_heap():  # nested users share the setting
        assert mapped_while_held() < base + (64 << 20)
    assert mapped_while_held() >= base + (64 << 20)  # restored once the last one ends
