import gzip
import numpy as np

def read_idx(path):
    op = gzip.open if str(path).endswith(".gz") else open
    with op(path, "rb") as f:
        b = f.read()
    n = int.from_bytes(b[3:4], "big")
    dims = [int.from_bytes(b[4 + 4 * i: 8 + 4 * i], "big") for i in range(n)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * n).reshape(dims)
