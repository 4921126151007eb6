from __future__ import annotations

import mmap

import array_api_compat.numpy as xp
import numpy as np

from ..errors import BackendError
from .base import Backend, _root

# Each weight is laid out the way a product of one row (a batch-1 decode step) streams it
# fastest. As the checkpoint's [out, in] array, given as its [in, out] transposed view,
# OpenBLAS's matrix-vector product runs its dot-product kernel (gemv "T"); as an [in, out]
# array in C order, its axpy kernel (gemv "N"), which streams a wide weight faster. Measured on
# SkylakeX, 2 threads, each of SmolLM2's shapes 30 times over from memory, [in, out] in C order
# took 0.82x the time for q|k|v (576 x 960), 0.81x for o (576 x 576), 0.61x for gate|up
# (576 x 3072) and 0.72x for the head (576 x 49152), but 1.36x for down (1536 x 576). So a
# weight with out >= in is copied once at load into C order (SmolLM2: about 0.4 s of a warm
# start, 431 MB of the process's own memory), and the others stay the transposed view.
# Where the array it was copied from is a view of a mapped file (a GGUF's weights from the
# converted-weights cache), the copy keeps it for products of 8-32 rows (below), which take
# 1.08x the time on the copy; keeping it costs no memory of the process's own (its pages are
# the file's, shared). A safetensors model's weights are read into memory: they are not kept.
#
# A product of a few rows (a speculative verification, the last sequences of a batch) with a
# weight is taken as one matrix-vector product per row, over column blocks of about
# CHUNK_BYTES of the weight: the first row streams a block from memory and the others read it
# from the cache. OpenBLAS's matrix product packs the whole weight for such a product instead,
# at several times a matrix-vector product's cost. Measured on SkylakeX, 2 threads, SmolLM2's
# 30 layers and head (benchmarks/few_rows.py): 2 rows in 0.73x the time of matrix products over
# 256 KiB column blocks (what this replaced), 4 rows in 0.76x, 7 rows in 0.83x.
FEW_ROWS = range(2, 8)
CHUNK_BYTES = 4 << 20
# A product of 8-32 rows (a decode batch) with a transposed view is taken with the weight as
# the left operand, w^T @ x^T: OpenBLAS then streams the weight in panels and packs only the
# rows, where as the right operand the weight is packed whole. Measured on SkylakeX, 2 threads,
# SmolLM2's 30 layers from memory: 8 rows in 0.89x the time of the blocked product, 12 in
# 0.65x, 32 in 0.86x of numpy's own (x @ w); at 64 rows numpy's own is faster again. The
# [out, rows] result is given as its transposed view, not copied to C order: the ufunc or
# reshape after the product reads it as it lies (copying it took 13 % of a 32-row step's
# products; the model's forward over 32 prompts x 64 new tokens took 7.9 s against 8.5 with
# the copy, medians of 4 runs interleaved in one process, SkylakeX). A weight copied into C
# order takes them by the array it was copied from where it kept it, else as numpy's own
# x @ w: 32 prompts x 32 new tokens decoded at 0.93x the speed that way (medians of 6 runs
# interleaved in one process, SkylakeX).
SOME_ROWS = range(8, 33)
# the side of the square tiles a weight is transposed by (on SmolLM2's shapes 1.1-1.6x the
# rate of numpy's own copy of a transposed view)
TILE = 256


class LinearWeight(np.ndarray):
    """A linear layer's [in, out] weight (in C order where out >= in, else the transposed view
    of its [out, in] array) whose products with 2-7 rows go as one matrix-vector product per
    row by column blocks, and with 8-32 rows as w^T @ x^T by a transposed view (its own, or
    `mapped`: the one a copy was made from), the result given as its transposed view; any
    other product, and everything else, is numpy's own."""

    mapped: np.ndarray | None = None  # the mapped [in, out] view a C-order copy was made from

    def __rmatmul__(self, x):
        w = self.view(np.ndarray)
        rows = x.shape[0] if isinstance(x, np.ndarray) and x.ndim == 2 else 0
        if rows in FEW_ROWS:
            return blocked_matmul(x, w)
        if rows in SOME_ROWS:
            by = w if not w.flags.c_contiguous else self.mapped  # by.T: [out, in] as stored
            if by is not None:  # a transposed view: the next ufunc reads it as it is
                return np.matmul(by.T, x.T).T
        return np.matmul(x, w)


def blocked_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [M, K] @ w [K, N], by blocks of w's columns of about CHUNK_BYTES each, each block one
    matrix-vector product per row of x (a block is contiguous where w is the transposed view of
    an [N, K] array, K rows of its own width apart where w is in C order)."""
    m, (k, n) = x.shape[0], w.shape
    out = np.empty((m, n), dtype=np.result_type(x, w))
    cols = max(16, CHUNK_BYTES // (k * w.itemsize))
    for c in range(0, n, cols):
        block = w[:, c : c + cols]
        for i in range(m):
            np.matmul(x[i], block, out=out[i, c : c + cols])
    return out


def transposed_copy(a: np.ndarray) -> np.ndarray:
    """a.T in C order, copied tile by tile (each tile's reads and writes stay in the cache)."""
    out = np.empty(a.shape[::-1], dtype=a.dtype)
    for i in range(0, a.shape[1], TILE):
        for j in range(0, a.shape[0], TILE):
            out[i : i + TILE, j : j + TILE] = a[j : j + TILE, i : i + TILE].T
    return out


def attention(q, k, v, bias, scale):
    """Backend.fused_attention's kernel: softmax(q k^T * scale + bias) v, q [S, H, Q, D], k, v
    [S, KV, K, D], bias [S, 1, Q, K] -> [S, H, Q, D], each group of H // KV query heads reading
    one K/V head. The array-API form's arithmetic (layers/attention.py), on the scores in place:
    it allocates one [S, H, Q, K] array where that form allocates four, and on this VM freshly
    allocated memory costs more than the passes over it. SmolLM2, SkylakeX, 2 threads: a
    512-token prefill's attention (4 blocks of 128 queries) took 4.6 against 11.6 ms a layer
    alone and 5.4-8.6 against 10.2-10.4 in the model's forward; the prefill ran at 523 against
    471 tok/s (medians of 4 runs alternating in one process, the same tokens)."""
    S, H, Q, D = q.shape
    KV, K = k.shape[1], k.shape[2]
    G = H // KV
    q = np.reshape(q * np.float32(scale), (S, KV, G * Q, D))
    scores = np.reshape(np.matmul(q, np.swapaxes(k, -1, -2)), (S, KV, G, Q, K))
    scores += bias[:, None]  # -inf where a key is not seen; every query sees one
    scores -= np.max(scores, axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    total = np.sum(scores, axis=-1, keepdims=True)  # [S, KV, G, Q, 1]
    out = np.reshape(np.matmul(np.reshape(scores, (S, KV, G * Q, K)), v), (S, KV, G, Q, D))
    out /= total
    return np.reshape(out, (S, H, Q, D))


class NumpyBackend(Backend):
    # a lone decode query stays written out: it reads its runs of slots as slices and picks
    # the scores' orientation by the context's length (layers/attention._attend_one_query)
    fused_attention_lone_query = False

    def fused_attention(self):
        return attention

    def linear_weight(self, w):
        """[in, out] in C order where out >= in, else as the transposed view of an [out, in]
        array (see the top of this file)."""
        if w.shape[1] >= w.shape[0] and not w.flags.c_contiguous:
            copy = transposed_copy(w.T).view(LinearWeight)
            if isinstance(_root(w).base, mmap.mmap) and w.T.flags.c_contiguous:
                copy.mapped = w
            return copy
        if w.shape[1] < w.shape[0] and not w.flags.f_contiguous:
            w = transposed_copy(w).T
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
