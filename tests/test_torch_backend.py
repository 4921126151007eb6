"""The torch backend's linear weights on the CPU: packed once by oneDNN, multiplied by with
oneDNN's product (faster than torch's default on these shapes, see torch_backend.py); each
product gives torch's own, to float32 rounding, and the weight reads back as it was. Its
norms and SiLU (torch's kernels; on the CPU the RMS norm's mean square as a product) give the
array-API forms' values."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nanovllm.backend import get_backend  # noqa: E402
from nanovllm.backend.base import Backend  # noqa: E402
from nanovllm.backend.torch_backend import ONEDNN_LINEAR, PackedLinear  # noqa: E402

pytestmark = pytest.mark.skipif(not ONEDNN_LINEAR, reason="this torch build has no oneDNN linear")


def packed(hf: np.ndarray):
    """A Hugging Face [out, in] weight as the torch backend lays out a linear's weight."""
    b = get_backend("torch")
    return b, b.linear_weight(b.weight(hf).T)


@pytest.mark.parametrize("rows", [1, 2, 7, 32, 512])
@pytest.mark.parametrize("k, n", [(576, 6144), (1536, 576), (7, 3)])
def test_packed_products_equal_torchs(rows, k, n):
    rng = np.random.default_rng(rows)
    hf = rng.standard_normal((n, k), dtype=np.float32)  # [out, in], as checkpoints hold it
    b, w = packed(hf)
    assert isinstance(w, PackedLinear) and w.shape == (k, n)
    x = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32))
    with b.inference():
        got, want = x @ w, x @ torch.from_numpy(hf).T
    assert type(got) is torch.Tensor and got.shape == (rows, n) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_a_packed_weight_takes_any_leading_dims_and_reads_back_as_it_was():
    rng = np.random.default_rng(0)
    hf = rng.standard_normal((5, 4), dtype=np.float32)
    b, w = packed(hf)
    np.testing.assert_array_equal(b.to_host(w), hf.T)
    for shape in [(4,), (2, 3, 4)]:
        x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        got = b.to_host(x @ w)
        np.testing.assert_allclose(got, x.numpy() @ hf.T, rtol=1e-5, atol=1e-5)
        assert got.shape == (*shape[:-1], 5)


def test_a_packed_weight_refuses_any_use_but_x_at_w():
    _, w = packed(np.ones((5, 4), dtype=np.float32))
    x = torch.ones(2, 4)
    with pytest.raises(TypeError, match="add is not defined on a packed linear weight"):
        torch.add(x, w)
    with pytest.raises(TypeError, match=r"from the right only: x @ w"):
        torch.matmul(w, x.T)


@pytest.mark.parametrize("shape", [(1, 576), (32, 576), (5, 12, 64)])
def test_torchs_norm_and_silu_kernels_give_the_array_api_forms_values(shape):
    b = get_backend("torch")
    rng = np.random.default_rng(len(shape))
    x, w, bias = (
        torch.from_numpy(a)
        for a in (
            3 * rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(shape[-1:], dtype=np.float32),
            rng.standard_normal(shape[-1:], dtype=np.float32),
        )
    )
    written = Backend("torch", b.xp, b.device, b.dtype, b.int_dtype)  # layers/'s forms
    per_head = torch.from_numpy(rng.standard_normal(shape[1:], dtype=np.float32))  # Qwen3 q|k
    pairs = [
        (b.rms_norm(x, w, 1e-5), written.rms_norm(x, w, 1e-5)),
        (b.rms_norm(x, per_head, 1e-6), written.rms_norm(x, per_head, 1e-6)),
        (b.layer_norm(x, w, bias, 1e-5), written.layer_norm(x, w, bias, 1e-5)),
        (b.layer_norm(x, w, None, 1e-6), written.layer_norm(x, w, None, 1e-6)),
        (b.silu(x), written.silu(x)),
    ]
    assert type(b).rms_norm is not Backend.rms_norm  # the kernels are what is compared
    for got, want in pairs:
        assert got.shape == shape and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_the_models_linear_weights_are_packed(tiny_llama, backend):
    from nanovllm import LLM
    from nanovllm.models.base import linear_weights

    if backend != "torch":
        pytest.skip("a torch backend detail")
    llm = LLM(str(tiny_llama("gqa").path), backend="torch", verbose=False)
    assert all(isinstance(w, PackedLinear) for w in linear_weights(llm.model))
