from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np

from ..errors import BackendError
from .base import Backend

# A product of a few rows (a speculative verification, the last sequences of a batch) with a
# weight is taken as one matrix-vector product per row, over column blocks of about
# CHUNK_BYTES of the weight: the first row streams a block from memory and the others read it
# from the cache. OpenBLAS's matrix product packs the whole weight for such a product instead,
# at several times a matrix-vector product's cost. Measured on SkylakeX, 2 threads, SmolLM2's
# 30 layers and head (benchmarks/few_rows.py): 2 rows in 0.73x the time of matrix products over
# 256 KiB column blocks (what this replaced), 4 rows in 0.76x, 7 rows in 0.83x.
FEW_ROWS = range(2, 8)
CHUNK_BYTES = 4 << 20
# A product of 8-32 rows (a decode batch) is taken with the weight as the left operand,
# w^T @ x^T: OpenBLAS then streams the weight in panels and packs only the rows, where as the
# right operand the weight is packed whole. Measured on SkylakeX, 2 threads, SmolLM2's 30
# layers from memory: 8 rows in 0.89x the time of the blocked product, 12 in 0.65x, 32 in
# 0.86x of numpy's own (x @ w); at 64 rows numpy's own is faster again. The [out, rows] result
# is given as its transposed view, not copied to C order: the ufunc or reshape after the
# product reads it as it lies (copying it took 13 % of a 32-row step's products; the model's
# forward over 32 prompts x 64 new tokens took 7.9 s against 8.5 with the copy, medians of 4
# runs interleaved in one process, SkylakeX).
SOME_ROWS = range(8, 33)


class LinearWeight(np.ndarray):
    """A linear layer's [in, out] weight whose products with 2-7 rows go as one matrix-vector
    product per row by column blocks, and with 8-32 rows as w^T @ x^T (a transposed view, not
    C-ordered); any other product, and everything else, is numpy's own."""

    def __rmatmul__(self, x):
        w = self.view(np.ndarray)
        rows = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 2 else 0
        if rows in FEW_ROWS:
            return blocked_matmul(x, w)
        if rows in SOME_ROWS:  # w.T is the [out, in] array the weight was stored as
            return np.matmul(w.T, x.T).T  # a transposed view: the next ufunc reads it as it is
        return np.matmul(x, w)


def blocked_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] @ w [K, N], by blocks of w's columns of about CHUNK_BYTES each, each block one
    matrix-vector product per row of x (w is the transposed view of an [N, K] array, so each
    block is contiguous)."""
    m, (k, n) = x.shape[0], w.shape
    out = np.empty((m, n), dtype=np.result_type(x, w))
    cols = max(16, CHUNK_BYTES // (k * w.itemsize))
    for c in range(0, n, cols):
        block = w[:, c : c + cols]
        for i in range(m):
            np.matmul(x[i], block, out=out[i, c : c + cols])
    return out


class NumpyBackend(Backend):
    def linear_weight(self, w):
        return w.view(LinearWeight)


def make(device: str | None, dtype: str) -> Backend:
    if device not in (None, "cpu"):
        raise BackendError(
            f"device={device!r}: the numpy backend runs on the CPU only; "
            "pass device='cpu' or omit it"
        )
    if dtype != "float32":
        raise BackendError(
            f"dtype={dtype!r}: the numpy backend computes in float32 only "
            "(OpenBLAS has no fast float16/bfloat16); pass dtype='float32'"
        )
    return NumpyBackend("numpy", xp, "cpu", np.float32, np.int64)
