"""JAX: the step runs under jax.jit, with the KV pool donated so K/V writes are in place.

Sizes are rounded up to powers of two (`bucket`), so a run compiles a bounded number of
times; `compilations()` counts them.

With tensor_parallel_size N the backend runs on a 1-D mesh of N devices (`TensorParallel`):
weights are placed cut along the axis their `Weight.split` names (column-parallel q|k|v and
gate|up, row-parallel o and down, the vocabulary of the embedding and the head), the KV pools by
KV head, and everything else whole on every device. The model code is unchanged: jax.jit
compiles the step for those placements and XLA adds the collectives (the all-reduce after a
row-parallel product, the gathers where a split activation is needed whole). A size that does
not divide by N is placed whole on every device, and `describe()` says which.
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

    def scatter_rows(self, pool, slots, rows, axis=0):
        return pool.at[(slice(None),) * axis + (slots,)].set(rows.astype(pool.dtype))

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


class TensorParallel(JaxBackend):
    def __init__(self, name, xp, devices, dtype, int_dtype) -> None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        super().__init__(name, xp, devices[0], dtype, int_dtype)
        self.size = len(devices)
        self.mesh = Mesh(np.array(devices), ("tp",))
        self.whole = NamedSharding(self.mesh, PartitionSpec())
        self._pools: dict[tuple, object] = {}  # pool shape -> its sharding
        self.unsplit: dict[str, int] = {}  # what could not be cut, and how many, for describe()

    def _cut(self, axis: int):
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(*([None] * axis), "tp"))

    def _whole(self, what: str):
        self.unsplit[what] = self.unsplit.get(what, 0) + 1
        return self.whole

    def asarray(self, host, dtype=None):
        return jax.device_put(jnp.asarray(host, dtype=dtype), self.whole)

    def zeros(self, shape, dtype=None):
        return jnp.zeros(shape, dtype=dtype or self.dtype, device=self.whole)

    def shard(self, w, axis):
        if axis is None:
            return w
        if w.shape[axis] % self.size:
            self._whole(f"weights of {w.shape[axis]} along the cut axis")
            return w
        return jax.device_put(w, self._cut(axis))

    def kv_pool(self, shape):
        kv_heads = shape[0]
        if kv_heads % self.size:
            sharding = self._whole(f"K/V pools of {kv_heads} KV heads")
        else:
            sharding = self._cut(0)
        self._pools[tuple(shape)] = sharding
        return jnp.zeros(shape, dtype=self.dtype, device=sharding)

    def scatter_rows(self, pool, slots, rows, axis=0):
        # the written pool keeps the placement it came in with (so it is donated in place)
        written = super().scatter_rows(pool, slots, rows, axis)
        sharding = self._pools.get(tuple(pool.shape), self.whole)
        return jax.lax.with_sharding_constraint(written, sharding)

    def to_host(self, x):
        if not x.is_fully_addressable:  # several hosts: gather it whole onto each first
            x = jax.jit(lambda a: a, out_shardings=self.whole)(x)
            return np.asarray(x.addressable_data(0))
        return super().to_host(x)

    def describe(self) -> str:
        whole = ", ".join(f"{n} {what}" for what, n in self.unsplit.items())
        whole = (
            f"; whole on every device, as they do not divide by {self.size}: {whole}"
            if whole
            else ""
        )
        return (
            f"jax (tensor_parallel_size={self.size} over {self.device.platform} devices "
            f"{', '.join(str(d.id) for d in self.mesh.devices.flat)}, dtype="
            f"{getattr(self.dtype, '__name__', self.dtype)}{whole})"
        )


def make(device: str | None, dtype: str, tensor_parallel_size: int = 1) -> Backend:
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
    if tensor_parallel_size > 1:
        if len(devices) - index < tensor_parallel_size:
            kind = devices[0].platform
            raise BackendError(
                f"tensor_parallel_size={tensor_parallel_size}, but jax sees "
                f"{len(devices) - index} {kind} device(s) from index {index}; pass at most that"
                + (
                    ", or on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{tensor_parallel_size} before Python starts (host devices for testing)"
                    if kind == "cpu"
                    else ""
                )
            )
        chosen = devices[index : index + tensor_parallel_size]
        return TensorParallel("jax", jnp, chosen, DTYPES[dtype], jnp.int32)
    return JaxBackend("jax", jnp, devices[index], DTYPES[dtype], jnp.int32)
