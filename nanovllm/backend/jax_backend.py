"""JAX: the step runs under jax.jit, with the KV pool donated so K/V writes are in place.

Sizes are rounded up to powers of two (`bucket`), so a run compiles a bounded number of
times; `compilations()` counts them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import BackendError
from .base import Backend

_REGISTERED: set[type] = set()  # jax's pytree registry is process-wide
DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


class JaxBackend(Backend):
    jits = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jitted: list = []  # every function jit() made, for compilations()

    def asarray(self, host, dtype=None):
        return jax.device_put(jnp.asarray(host, dtype=dtype), self.device)

    def step_input(self, host, dtype=None):
        # left on the host: a jitted function moves its numpy arguments in one dispatch,
        # far cheaper than a device_put per array
        return np.asarray(host, dtype=None if dtype is None else np.dtype(dtype))

    def to_host(self, x):
        return np.asarray(jax.device_get(x))

    def scatter_rows(self, pool, slots, rows):
        return pool.at[slots].set(rows.astype(pool.dtype))

    def register_step_dataclass(self, cls) -> None:
        """A dataclass the jitted step takes: its `static_fields` are compiled in, the other
        fields are traced arrays."""
        if cls not in _REGISTERED:
            static = cls.static_fields
            data = [f.name for f in dataclasses.fields(cls) if f.name not in static]
            jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(static))
            _REGISTERED.add(cls)

    def jit(self, fn, donate_argnums=(), **kwargs):
        jitted = jax.jit(fn, donate_argnums=donate_argnums, **kwargs)
        self.jitted.append(jitted)
        return jitted

    def bucket(self, n: int) -> int:
        return 1 << max(n - 1, 0).bit_length()  # the next power of two

    def compilations(self) -> int:
        return sum(f._cache_size() for f in self.jitted)


def make(device: str | None, dtype: str) -> Backend:
    if dtype not in DTYPES:
        raise BackendError(
            f"dtype={dtype!r} is not supported by the jax backend; choose one "
            f"of {', '.join(DTYPES)}"
        )
    platform = {"gpu": "gpu", "cuda": "gpu"}.get((device or "").split(":")[0], device)
    try:
        devices = jax.devices(platform) if platform else jax.devices()
    except RuntimeError as exc:
        raise BackendError(
            f"device={device!r}: jax has no such device here ({exc}); pass "
            "device='cpu', or install jax[cuda] on a GPU machine"
        ) from exc
    index = int(device.split(":")[1]) if device and ":" in device else 0
    return JaxBackend("jax", jnp, devices[index], DTYPES[dtype], jnp.int32)
