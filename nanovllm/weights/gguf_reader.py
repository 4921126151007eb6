"""A GGUF file's metadata and tensor index, read in bulk.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value, which costs
seconds on a real vocabulary (two arrays of ~50,000 strings). This reader walks the header
once with `struct` over a memory map and decodes each value as it goes: strings to `str`,
arrays to lists, and numeric arrays with one `numpy.frombuffer`. The tensors stay views of
the memory map, in the dtypes `gguf.quants.dequantize` takes, so `gguf` still does the
dequantizing. The layout: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's tensors have at most 4
# GGUF value types: id -> struct format of one scalar (8 = string, 9 = array)
SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
STRING, ARRAY = 8, 9
U64 = struct.Struct("<Q")
# tensor types whose data is read as typed numbers; every other type is raw bytes (uint8)
ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (the caller adds the file's name)."""


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: innermost (row length) first
    n_elements: int
    n_bytes: int
    data: np.ndarray  # a read-only view of the file: typed numbers, or bytes [..., row bytes]


class GGUFFile:
    """`fields`: every metadata key -> its decoded value; `tensors`: the index, in file order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map = np.memmap(path, mode="r")
        self._buf = memoryview(self._map)  # type: ignore[arg-type]  # (a memmap is a buffer)
        self._pos = 0
        if bytes(self._take(4)) != MAGIC:
            raise GGUFFormatError("it does not start with the GGUF magic bytes")
        version = self._scalar("I")
        if version not in VERSIONS:
            if version & 0xFFFF == 0:
                raise GGUFFormatError("it is a big-endian GGUF file, which is not supported")
            raise GGUFFormatError(f"GGUF version {version} is not supported; supported: 2, 3")
        tensor_count, kv_count = self._scalar("Q"), self._scalar("Q")
        # a key/value takes at least 12 bytes and a tensor's entry at least 24: counts that
        # cannot fit are damage, caught before any loop over them
        if 12 * kv_count + 24 * tensor_count > len(self._buf) - self._pos:
            raise GGUFFormatError(
                f"the header announces {kv_count} metadata keys and {tensor_count} tensors, "
                f"which runs past the end of the file"
            )
        self.fields: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self._string()
            if key in self.fields:
                raise GGUFFormatError(f"the metadata key {key!r} appears twice")
            self.fields[key] = self._value(self._scalar("I"))
        infos = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment={alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        names = [info[0] for info in infos]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise GGUFFormatError(f"tensor {twice!r} appears twice")
        self.tensors = [self._tensor(data_start, *info) for info in infos]

    # ---- the header, front to back ------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._buf):
            raise GGUFFormatError(f"the header runs past the end of the file at byte {self._pos}")
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def _scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self._take(size))[0]

    def _string(self) -> str:
        raw = self._take(self._scalar("Q"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a string at byte {self._pos - len(raw)} is not UTF-8") from e

    def _value(self, kind: int) -> Any:
        if kind in SCALARS:
            return self._scalar(SCALARS[kind])
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {kind} at byte {self._pos - 4}")
        item, count = self._scalar("I"), self._scalar("Q")
        if item in SCALARS and item != 7:  # numbers: one read
            dtype = np.dtype("<" + SCALARS[item])
            return np.frombuffer(self._take(count * dtype.itemsize), dtype).tolist()
        if count > len(self._buf) - self._pos:  # every item takes at least one byte
            raise GGUFFormatError(f"an array of {count} items at byte {self._pos} is too long")
        if item == STRING:
            return self._strings(count)
        return [self._value(item) for _ in range(count)]

    def _strings(self, count: int) -> list[str]:
        """`count` strings back to back (a vocabulary): the hot loop of a real file."""
        buf, pos, end, out = self._buf, self._pos, len(self._buf), []
        try:
            for _ in range(count):
                (n,) = U64.unpack_from(buf, pos)
                if pos + 8 + n > end:
                    break
                out.append(str(buf[pos + 8 : pos + 8 + n], "utf-8"))
                pos += 8 + n
        except (struct.error, UnicodeDecodeError) as e:
            raise GGUFFormatError(f"a string array at byte {self._pos} is corrupt ({e})") from e
        if len(out) < count:
            raise GGUFFormatError(f"the header runs past the end of the file at byte {pos}")
        self._pos = pos
        return out

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        num_dims = self._scalar("I")
        if num_dims > MAX_DIMS:
            raise GGUFFormatError(f"tensor {name!r} has {num_dims} dimensions (at most 4)")
        dims = tuple(self._scalar("Q") for _ in range(num_dims))
        return name, dims, self._scalar("I"), self._scalar("Q")

    def _tensor(
        self, data_start: int, name: str, dims: tuple[int, ...], kind: int, offset: int
    ) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFFormatError(f"tensor {name!r} has unknown type {kind}") from None
        n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block, type_size = GGML_QUANT_SIZES[qtype]
        if not dims or dims[0] % block:
            raise GGUFFormatError(
                f"tensor {name!r} has rows of {dims[:1]} values, not a multiple of "
                f"{qtype.name}'s block of {block}"
            )
        n_bytes = n_elements // block * type_size
        start = data_start + offset
        if start + n_bytes > len(self._map):
            raise GGUFFormatError(
                f"tensor {name!r} needs bytes {start}..{start + n_bytes} but the file has "
                f"{len(self._map)}; the file is truncated"
            )
        raw = self._map[start : start + n_bytes]
        outer = tuple(reversed(dims[1:]))
        if qtype in ELEMENT_DTYPES:
            data = raw.view(ELEMENT_DTYPES[qtype]).reshape(*outer, dims[0])
        else:
            data = raw.reshape(*outer, dims[0] // block * type_size)
        return GGUFTensor(name, qtype, dims, n_elements, n_bytes, np.asarray(data))
