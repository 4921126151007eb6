"""A Hugging Face model directory: config.json plus model.safetensors (or its shards)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import WeightsError
from ..memory import check_fits

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# safetensors dtype -> the little-endian numpy dtype its bytes are read as
_RAW_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
_MAX_HEADER = 100 * 1024 * 1024


def load_hf_dir(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json as a dict, and every tensor as a float32 numpy array keyed by its HF name."""
    path = Path(path)
    if not path.is_dir():
        raise WeightsError(
            f"{path} is not a directory; pass a Hugging Face model directory "
            f"holding {CONFIG} and {SINGLE}"
        )
    config = read_config(path / CONFIG)
    tensors: dict[str, np.ndarray] = {}
    for file, expected in _weight_files(path):
        loaded = read_safetensors(file)
        missing = sorted(expected - loaded.keys()) if expected is not None else []
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise WeightsError(
                f"{file} lacks tensor {missing[0]!r}{more} that {path / INDEX} "
                f"places there; download the shard again"
            )
        tensors.update(loaded)
    return config, tensors


def read_config(file: Path) -> dict:
    if not file.is_file():
        raise WeightsError(
            f"{file} is missing; a model directory needs the {CONFIG} that "
            f"save_pretrained writes next to the weights"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{file} is not valid JSON ({e}); download it again") from e
    if not isinstance(config, dict):
        raise WeightsError(
            f"{file} holds a {type(config).__name__}, not a JSON object; download it again"
        )
    return config


def _weight_files(path: Path) -> list[tuple[Path, set[str] | None]]:
    """Each weight file with the tensor names the index expects in it (None: no index)."""
    if (path / SINGLE).is_file():
        return [(path / SINGLE, None)]
    index = path / INDEX
    if not index.is_file():
        raise WeightsError(
            f"{path} has neither {SINGLE} nor {INDEX}; save the model with "
            f"save_pretrained(..., safe_serialization=True)"
        )
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, set()).add(name)
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        AttributeError,
    ) as e:
        raise WeightsError(
            f"{index} is not a valid safetensors index ({e!r}); download it again"
        ) from e
    files: list[tuple[Path, set[str] | None]] = [
        (path / shard, names) for shard, names in sorted(shards.items())
    ]
    for file, _ in files:
        if not file.is_file():
            raise WeightsError(f"shard {file} listed in {index} is missing; download it again")
    return files


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file, widened to float32 on the host (copies)."""
    return read_safetensors_with_metadata(file)[0]


def read_safetensors_with_metadata(
    file: Path, copy: bool = True
) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor of one .safetensors file, widened to float32 on the host, and the header's
    `__metadata__` ({} if none). The tensors are copies, or with `copy=False` float32 ones are
    read-only views of the mapped file (for a file that is only ever replaced by a rename,
    never rewritten in place)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(
                f"{file} is truncated ({size} bytes, shorter than the 8-byte "
                f"header length); download it again"
            )
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _MAX_HEADER):
            raise WeightsError(
                f"{file} is truncated or corrupt: its header claims {header_len} "
                f"bytes but the file has {size}; download it again"
            )
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
            if not isinstance(header, dict):
                raise TypeError("the header is not a JSON object")
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
            raise WeightsError(f"{file} has a corrupt header ({e}); download it again") from e
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    if copy:  # (a mapped file's pages are the page cache's, not this process's)
        check_fits(
            f"{file}: its weights widened to float32",
            _float32_bytes(header, size - start),
            "use a smaller model or free memory",
        )
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=start) if size > start else None
    items = tqdm(
        header.items(),
        desc=f"Loading {file.name}",
        unit="tensor",
        leave=False,
        disable=len(header) < 64 or not copy,
    )
    tensors = {name: _tensor(file, name, info, data, size - start, copy) for name, info in items}
    return tensors, metadata


def _float32_bytes(header: dict, data_size: int) -> int:
    """What the well-formed entries of a header take as float32 (a corrupt entry is left to
    _tensor, which names it)."""
    total = 0
    for info in header.values():
        try:
            raw = np.dtype(_RAW_DTYPES[info["dtype"]])
            (begin, end), elements = info["data_offsets"], math.prod(info["shape"])
        except (TypeError, KeyError, ValueError):
            continue
        if (
            isinstance(elements, int)
            and 0 <= begin <= end <= data_size
            and end - begin == elements * raw.itemsize
        ):
            total += 4 * elements
    return total


def _tensor(file: Path, name: str, info: Any, data: Any, data_size: int, copy: bool) -> np.ndarray:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        shape = tuple(int(n) for n in shape)
    except (TypeError, KeyError, ValueError) as e:
        raise WeightsError(
            f"{file}: tensor {name!r} has a corrupt header entry {info!r}; download the file again"
        ) from e
    if dtype not in _RAW_DTYPES:
        raise WeightsError(
            f"{file}: tensor {name!r} has dtype {dtype}; supported: "
            f"{', '.join(_RAW_DTYPES)}; convert it, e.g. "
            f"model.float().save_pretrained(...)"
        )
    raw = np.dtype(_RAW_DTYPES[dtype])
    if end > data_size:
        raise WeightsError(
            f"{file} is truncated: tensor {name!r} ends at byte {end} of the data "
            f"but only {data_size} bytes are there; download it again"
        )
    if not 0 <= begin <= end or end - begin != math.prod(shape) * raw.itemsize:
        raise WeightsError(
            f"{file}: tensor {name!r} of {dtype}{list(shape)} has offsets "
            f"[{begin}, {end}] that do not fit its size; the file is corrupt"
        )
    if begin == end:
        return np.zeros(shape, np.float32)
    values = data[begin:end].view(raw).reshape(shape)
    if dtype == "BF16":
        widened = values.astype(np.uint32)
        widened <<= 16
        return widened.view(np.float32)
    return values.astype(np.float32, copy=copy)
