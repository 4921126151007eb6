"""array-api-strict, pinned to 2024.12: proves the model code uses only the standard."""

from __future__ import annotations

import numpy as np

from ..errors import BackendError
from .base import Backend


class StrictBackend(Backend):
    def to_host(self, x):
        return np.from_dlpack(x)

    def scatter_rows(self, pool, slots, rows, axis=0):
        # The standard has no integer-array assignment: select rows with a boolean mask.
        xp = self.xp
        host_slots = self.to_host(slots)
        source = np.zeros(pool.shape[axis], dtype=np.int64)
        source[host_slots] = np.arange(host_slots.shape[0])
        mask = np.zeros(pool.shape[axis], dtype=bool)
        mask[host_slots] = True
        picked = xp.take(rows, self.asarray(source), axis=axis)
        shape = tuple(n if i == axis else 1 for i, n in enumerate(pool.shape))
        return xp.where(xp.reshape(self.asarray(mask), shape), picked, pool)


def make(device: str | None, dtype: str) -> Backend:
    import array_api_strict as xp

    xp.set_array_api_strict_flags(api_version="2024.12")
    if dtype != "float32":
        raise BackendError(
            f"dtype={dtype!r}: the array_api_strict backend is a float32 "
            "checker; pass dtype='float32'"
        )
    dev = xp.Device("CPU_DEVICE") if device in (None, "cpu") else None
    if dev is None:
        raise BackendError(f"device={device!r}: array_api_strict runs on 'cpu' only")
    return StrictBackend("array_api_strict", xp, dev, xp.float32, xp.int64)
