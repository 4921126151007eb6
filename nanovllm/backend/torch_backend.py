"""PyTorch through array_api_compat: CPU here, CUDA where available."""

from __future__ import annotations

import array_api_compat.torch as xp
import numpy as np
import torch

from ..errors import BackendError
from .base import Backend

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend(Backend):
    def asarray(self, host, dtype=None):
        if isinstance(host, np.ndarray):
            host = np.ascontiguousarray(host)
            # (a weight mapped read-only from the converted-weights file: torch wants it writable)
            host = torch.from_numpy(host if host.flags.writeable else host.copy())
        return xp.asarray(host, dtype=dtype, device=self.device)

    def to_host(self, x):
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.cpu().numpy()

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
