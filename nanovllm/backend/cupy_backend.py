"""CuPy through array_api_compat, offered only where a real GPU allocation succeeds."""

from __future__ import annotations

import array_api_compat.cupy as xp
import cupy

from ..errors import BackendError
from .base import Backend

DTYPES = {"float32": cupy.float32, "float16": cupy.float16}


class CupyBackend(Backend):
    def asarray(self, host, dtype=None):
        with self.device:
            return xp.asarray(host, dtype=dtype)

    def to_host(self, x):
        return cupy.asnumpy(x)

    def zeros(self, shape, dtype=None):
        with self.device:
            return xp.zeros(shape, dtype=dtype or self.dtype)


def make(device: str | None, dtype: str) -> Backend:
    if dtype not in DTYPES:
        raise BackendError(
            f"dtype={dtype!r} is not supported by the cupy backend; choose one "
            f"of {', '.join(DTYPES)} (CuPy has no bfloat16)"
        )
    index = 0
    if device not in (None, "gpu", "cuda"):
        if not str(device).startswith(("cuda:", "gpu:")):
            raise BackendError(
                f"device={device!r}: cupy runs on CUDA GPUs; pass 'cuda' or 'cuda:N'"
            )
        index = int(str(device).split(":")[1])
    try:
        dev = cupy.cuda.Device(index)
        with dev:
            cupy.asnumpy(cupy.arange(4, dtype=cupy.float32) * 2)  # a real allocation and kernel
    except Exception as exc:  # no driver, no device, or a broken CUDA install
        raise BackendError(
            f"backend 'cupy' cannot use a GPU here ({type(exc).__name__}: {exc}); "
            "it needs an NVIDIA GPU with a CUDA driver and a matching cupy-cudaXXx "
            "package. Use backend='numpy' on a CPU"
        ) from exc
    return CupyBackend("cupy", xp, dev, DTYPES[dtype], cupy.int64)
