"""Keeping freed memory for reuse in loops of same-sized tensors (glibc's malloc)."""
import contextlib
import ctypes
import ctypes.util
import functools
import platform
import threading

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_M_TRIM_THRESHOLD_DEFAULT, _M_MMAP_MAX_DEFAULT = 128 * 1024, 65536
_heap_lock = threading.Lock()
_heap_users = 0


@functools.cache
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def reused_heap():
    """While a loop of same-sized steps runs, keep freed memory in the heap for the next step.

    torch has no caching allocator on the CPU, and glibc maps every block above its mmap
    threshold (at most 32 MiB) fresh from the kernel, to be zeroed page by page at first touch:
    a readout group's activations (a depth readout's (G, B, T, H, W) output) paid that every step
    (grids of 4 depth readouts at 64 x 64 ran 1.7-2x slower), and a feature dump spent a fifth of
    its CPU time in the kernel. Inside, nothing is mapped and nothing freed is given back, which
    is what LD_PRELOADing jemalloc would do; the defaults are restored (and the heap trimmed)
    when the last user in the process leaves. glibc only; elsewhere this does nothing. Also a
    decorator (`@reused_heap()`)."""
    global _heap_users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                libc.mallopt(_M_MMAP_MAX, _M_MMAP_MAX_DEFAULT)
                libc.mallopt(_M_TRIM_THRESHOLD, _M_TRIM_THRESHOLD_DEFAULT)
                libc.malloc_trim(0)
