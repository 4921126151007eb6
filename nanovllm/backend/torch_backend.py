"""PyTorch through array_api_compat: CPU here, CUDA where available."""

from __future__ import annotations

import functools

import array_api_compat.torch as xp
import numpy as np
import torch

from ..errors import BackendError
from .base import Backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# oneDNN's packed linear (torch's private ops, present in every x86 CPU build of the pinned torch)
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
)


class PackedLinear:
    """A linear layer's [in, out] float32 weight on the CPU, packed once at load time by oneDNN
    (the kernels torch.compile's freezing uses for a linear); `x @ w` multiplies by the packed
    weight with oneDNN instead of torch's default product (MKL). Only the packed copy is kept,
    but for an output head tied to the embedding, whose table the embedding still reads: that
    is packed beside it (vocab x hidden more floats: 113 MB for SmolLM2-135M).

    On this AMD CPU MKL's products took 1.3-2.5x the time. Every linear weight of SmolLM2, one
    after another (`python benchmarks/few_rows.py --backend torch --rows 1 5 32 512`, medians
    of 7 rounds, 2 threads): 1 row 26.6 ms packed against 45.6, 5 rows 22.0 against 55.5, 32
    rows 55.7 against 92.4, 512 rows 711 against 911. oneDNN picks its kernels by the CPU's
    instruction sets alone, whoever made it.

    Not a tensor: it has `__torch_function__`, so torch hands it `x @ w` (Tensor.matmul) and
    torch.matmul, and nothing else: any other use raises. `shape` is [in, out], as the model
    and the benchmarks read a linear weight; `to_host` unpacks it.
    """

    def __init__(self, w):
        self.shape = tuple(w.shape)  # [in, out]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), None)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # `x @ w` from torch.Tensor.__matmul__ (or torch.matmul) lands here; nothing else does
        if func not in (torch.Tensor.matmul, torch.matmul) or kwargs:
            raise TypeError(f"{func.__name__} is not defined on a packed linear weight")
        x, w = args
        if not isinstance(w, PackedLinear):
            raise TypeError("a packed linear weight multiplies from the right only: x @ w")
        lead = x.shape[:-1]
        if len(lead) != 1:
            x = torch.reshape(x, (-1, x.shape[-1]))
        y = torch.ops.mkldnn._linear_pointwise(x, w.packed, None, "none", [], "")
        return y if len(lead) == 1 else torch.reshape(y, (*lead, w.shape[1]))


@functools.cache
def mean_column(n: int, dtype) -> torch.Tensor:
    """[n, 1] of 1/n on the CPU: x @ it is the mean of x's last axis."""
    return torch.full((n, 1), 1.0 / n, dtype=dtype)


def scaled_dot_product_attention(q, k, v, bias, scale):
    """Backend.fused_attention's kernel: torch's, with grouped K/V heads."""
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=scale, enable_gqa=True
    )


class TorchBackend(Backend):
    def asarray(self, host, dtype=None):
        if isinstance(host, np.ndarray):
            host = np.ascontiguousarray(host)
            # (a weight mapped read-only from the converted-weights file: torch wants it writable)
            host = torch.from_numpy(host if host.flags.writeable else host.copy())
        return xp.asarray(host, dtype=dtype, device=self.device)

    def to_host(self, x):
        if isinstance(x, PackedLinear):  # read back as the [in, out] array it was packed from
            x = x.packed.to_dense().T
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()

    def linear_weight(self, w):
        if self.device.type == "cpu" and w.dtype == torch.float32 and ONEDNN_LINEAR:
            return PackedLinear(w)
        return w

    def fused_attention(self):
        # on the CPU, one fused kernel instead of the softmax's passes over the scores: a
        # 512-token prefill took 0.93x the time written out, a 32 x 64 fixed batch 0.92x (this
        # AMD CPU, 2 threads). Not timed on a GPU, whose kernels for an additive mask and
        # grouped heads may differ: there the attention stays written out
        return scaled_dot_product_attention if self.device.type == "cpu" else None

    # torch's own kernels, one call each where the array-API forms take several. On the CPU
    # the RMS norm's mean square is a matrix-vector product by a column of 1/n (elsewhere the
    # RMS norm is the array-API form, as before: not timed on a GPU here): torch's
    # reductions (F.rms_norm's mean among them) took 3-6x as long right after a oneDNN product
    # as alone (48 against 15 us for [1, 576]), a product 8 us. In a batch-1 decode step of
    # SmolLM2 the 61 norms took 5.1 ms written out, 2.3 ms as F.rms_norm; the step decoded at
    # 24.0 tok/s written out, 26.6 as F.rms_norm and 27.7 by the product (medians of 6-8 runs,
    # alternating in one process)
    def rms_norm(self, x, weight, eps):
        if self.device.type != "cpu":
            return super().rms_norm(x, weight, eps)
        mean_square = (x * x) @ mean_column(x.shape[-1], x.dtype)  # [..., 1]
        return x * torch.rsqrt(mean_square + eps) * weight

    def layer_norm(self, x, weight, bias, eps):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def silu(self, x):
        return torch.nn.functional.silu(x)

    def scatter_rows(self, pool, slots, rows, axis=0):
        pool.index_copy_(axis, slots, rows.to(pool.dtype))
        return pool

    def inference(self):
        return torch.inference_mode()


def make(device: str | None, dtype: str) -> Backend:
    if dtype not in DTYPES:
        raise BackendError(
            f"dtype={dtype!r} is not supported by the torch backend; "
            f"choose one of {', '.join(DTYPES)}"
        )
    if device is None:  # like jax: the GPU when there is one
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = "cuda" if device == "gpu" else device
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise BackendError(
            f"device={device!r} is not a torch device ({exc}); pass 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            f"device={device!r}: torch sees no CUDA device here; pass "
            "device='cpu' or install a CUDA build of torch on a GPU machine"
        )
    return TorchBackend("torch", xp, dev, DTYPES[dtype], torch.int64)
