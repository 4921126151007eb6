"""Batch-invariant mode's pass size: the most rows a matrix product may take while every row's
result stays the same bits wherever the row sits among them.

That a row's sums do not depend on its neighbours is not enough: on some CPUs they depend on
its place. OpenBLAS's Haswell sgemm (AVX2 CPUs) sums row 6 of a 16-row product in another
order than row 0, and 8-row products are exact; its SkylakeX kernels (AVX-512) are exact at
16 rows. So the runner asks the backend, once at start-up, with the model's own linear
weights (their shapes and layouts pick the kernel): rows rolled by one place must give the
product's rows rolled by one place, bit for bit. The first size in ROW_BLOCKS that passes for
every weight is the pass size.
"""

from __future__ import annotations

import numpy as np

ROW_BLOCKS = (16, 8, 4, 2, 1)


def rows_are_position_invariant(backend, weight, rows: int, seed: int = 0) -> bool:
    """x [rows, in] @ weight [in, out]: does rolling x's rows roll the result's rows exactly?
    (Each row is compared at two places, and the places chain through all of them.)"""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, weight.shape[0])).astype(np.float32)
    y = backend.to_host(backend.asarray(x, dtype=backend.dtype) @ weight)
    rolled = backend.to_host(backend.asarray(np.roll(x, 1, axis=0), dtype=backend.dtype) @ weight)
    return bool(np.array_equal(rolled, np.roll(y, 1, axis=0)))


def invariant_row_block(backend, weights: list) -> int:
    """The largest of ROW_BLOCKS at which every weight's products are row-position invariant."""
    distinct = list({tuple(w.shape): w for w in weights}.values())
    with backend.inference():
        for rows in ROW_BLOCKS:
            if all(rows_are_position_invariant(backend, w, rows) for w in distinct):
                return rows
    return 1
