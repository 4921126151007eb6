"""The numpy backend's linear weights: a wide one (out >= in) is copied once into C order, a
narrow one stays the transposed view of its [out, in] array (the layouts a 1-row product
streams fastest on OpenBLAS, see numpy_backend.py); a product with 2-7 rows goes as one
matrix-vector product per row over column blocks and one with 8-32 rows, by a transposed
view, as w^T @ x^T (given as that product's transposed view), a copied weight's by the mapped
view it was copied from where there is one; each gives numpy's own product, to float32
rounding."""

from __future__ import annotations

import numpy as np
import pytest

from nanovllm.backend import get_backend
from nanovllm.backend.numpy_backend import LinearWeight


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 8, 9, 32, 33])  # 2-7 by rows, 8-32 transposed
@pytest.mark.parametrize("k, n", [(576, 49152 // 8), (576, 576), (1536, 576), (7, 3), (3, 7)])
@pytest.mark.parametrize("source", ["memory", "mapped"])
def test_few_row_products_equal_numpys(rows, k, n, source, tmp_path):
    rng = np.random.default_rng(rows)
    hf = rng.standard_normal((n, k), dtype=np.float32)  # [out, in], as checkpoints hold it
    if source == "mapped":  # as the converted-weights cache gives it
        hf.tofile(tmp_path / "w.bin")
        hf = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="r", shape=(n, k))
    w = get_backend("numpy").linear_weight(hf.T)
    assert isinstance(w, LinearWeight)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    got, want = x @ w, x @ np.asarray(hf).T
    assert type(got) is np.ndarray and got.shape == (rows, n) and got.dtype == np.float32
    # 8-32 rows by a transposed view (the weight's own, or the mapped one it was copied from)
    # give the product's transposed view
    by_view = not w.flags.c_contiguous or (source == "mapped" and n >= k)
    assert got.flags.c_contiguous != (rows in range(8, 33) and by_view)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("k, n", [(576, 960), (576, 576), (1536, 576), (7, 3)])
@pytest.mark.parametrize("stored", ["out_in", "in_out"])  # a checkpoint's, or GPT-2's Conv1D
def test_wide_weights_are_in_c_order_and_narrow_ones_transposed_views(k, n, stored):
    rng = np.random.default_rng(k + n)
    hf = rng.standard_normal((n, k), dtype=np.float32)
    given = hf.T if stored == "out_in" else np.ascontiguousarray(hf.T)  # [in, out] either way
    w = get_backend("numpy").linear_weight(given)
    assert w.shape == (k, n)
    np.testing.assert_array_equal(w, hf.T)
    if n >= k:  # wide: [in, out] in C order, copied unless given so
        assert w.flags.c_contiguous
        assert np.shares_memory(w, given) == (stored == "in_out")
        assert w.mapped is None  # (what it was copied from lies in memory: not kept)
    else:  # narrow: the transposed view of an [out, in] array, copied unless given so
        assert w.flags.f_contiguous and not w.flags.c_contiguous
        assert np.shares_memory(w, given) == (stored == "out_in")


def test_a_wide_weight_copied_from_a_mapped_file_keeps_the_mapped_view(tmp_path):
    hf = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)  # [out, in]: wide
    hf.tofile(tmp_path / "w.bin")
    mapped = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="r", shape=(6, 4))
    w = get_backend("numpy").linear_weight(mapped.T)
    assert w.flags.c_contiguous and not np.shares_memory(w, mapped)
    assert w.mapped is not None and np.shares_memory(w.mapped, mapped)
    np.testing.assert_array_equal(w.mapped, w)


def test_the_models_linear_weights_are_numpys_blocked_kind(tiny_llama, backend):
    from nanovllm import LLM
    from nanovllm.models.base import linear_weights

    if backend != "numpy":
        pytest.skip("a numpy backend detail")
    llm = LLM(str(tiny_llama("gqa").path), verbose=False)
    weights = linear_weights(llm.model)
    assert all(isinstance(w, LinearWeight) for w in weights)
    # wide ones in C order, narrow ones the transposed views of their [out, in] arrays
    assert all(w.flags.c_contiguous == (w.shape[1] >= w.shape[0]) for w in weights)
