from __future__ import annotations

import array_api_compat.numpy as xp
import numpy as np

from ..errors import BackendError
from .base import Backend


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
    return Backend("numpy", xp, "cpu", np.float32, np.int64)
