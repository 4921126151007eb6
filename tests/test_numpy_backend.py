"""The numpy backend's linear weights: a product with 2-7 rows goes as one matrix-vector
product per row over column blocks and one with 8-32 rows as w^T @ x^T (faster on OpenBLAS,
see numpy_backend.py, given as that product's transposed view); each gives numpy's own
product, to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm.backend import get_backend
from nanovllm.backend.numpy_backend import LinearWeight


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 9, 32, 33])  # 2-7 by rows, 8-32 transposed
@pytest.mark.parametrize("k, n", [(576, 49152 // 8), (1536, 576), (7, 3)])
def test_few_row_products_equal_numpys(rows, k, n):
    rng = np.random.default_rng(rows)
    hf = rng.standard_normal((n, k), dtype=np.float32)  # [out, in], as checkpoints hold it
    w = get_backend("numpy").linear_weight(hf.T)
    assert isinstance(w, LinearWeight)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    got, want = x @ w, x @ hf.T
    assert type(got) is np.ndarray and got.shape == (rows, n) and got.dtype == np.float32
    assert got.flags.c_contiguous or rows in range(8, 33)  # (8-32: the transposed view)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_the_models_linear_weights_are_numpys_blocked_kind(tiny_llama, backend):
    from nanovllm import LLM
    from nanovllm.models.base import linear_weights

    if backend != "numpy":
        pytest.skip("a numpy backend detail")
    llm = LLM(str(tiny_llama("gqa").path), verbose=False)
    assert all(isinstance(w, LinearWeight) for w in linear_weights(llm.model))
