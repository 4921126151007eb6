"""A GGUF file's dequantized float32 tensors and config, kept on disk so the next load maps them.

Dequantizing the default model takes most of a start-up, so the first load writes what it made
to a safetensors file in `$XDG_CACHE_HOME/nanovllm/converted` (or `$NANOVLLM_WEIGHTS_CACHE`;
`0` or `off` turns the cache off), and later loads map that file instead: no dequantizing, no
copy, and on the numpy backend the pages of the weights it multiplies by as they lie are
shared by every process that loads the same model (it copies the wide linear weights into the
layout its products stream fastest: backend/numpy_backend.py).

- The file is named by the GGUF's identity: its path, size and mtime, a hash of its first MiB
  (header and metadata), and a hash of the code that converts it (gguf_file.py and this file),
  so a changed model file or a changed conversion makes a new entry; storing it removes the
  old entries of the same GGUF path.
- It is written to a temporary file and renamed into place, so two processes filling it at
  once each write whole files and the last rename wins; a reader never sees a partial one.
- The tensors are written in the order the model reads them (`order`), so weights the model
  joins (q|k|v, gate|up) lie back to back and join without a copy (backend/base.py:
  join_rows).
- The tensors were checked finite before they were stored; a mapped load does not check again.
- A cache that cannot be written (read-only, or the disk would be left with under 1 GiB free)
  or read back (corrupt) is reported as a warning and the load goes on from the GGUF itself;
  a temporary file a killed process left is removed an hour later, by the next store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from .default_model import cache_dir
from .safetensors_dir import read_safetensors_with_metadata

ENV = "NANOVLLM_WEIGHTS_CACHE"
HEAD_BYTES = 1 << 20  # the part of a GGUF hashed into its key: the header and metadata
ALIGN = 64  # the tensor data starts at a multiple of this in the file
KEEP_FREE = 1 << 30  # an entry is not written where it would leave less disk free than this
STALE = 3600  # seconds after which a temporary file no process writes to any more is removed
_CODE = [Path(__file__).with_name("gguf_file.py"), Path(__file__)]  # what converts a GGUF


def cache_root() -> Path | None:
    """The directory converted weights go in, or None where the cache is turned off."""
    setting = os.environ.get(ENV)
    if setting is not None and setting.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    return Path(setting) if setting else cache_dir() / "converted"


def entry_path(gguf: Path) -> Path | None:
    """Where the converted tensors of this GGUF file are (or would be) kept."""
    root = cache_root()
    if root is None:
        return None
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(gguf, "rb") as f:
        key.update(f.read(HEAD_BYTES))
    for code in _CODE:
        key.update(code.read_bytes())
    return root / f"{_prefix(gguf)}{key.hexdigest()[:16]}.safetensors"


def _prefix(gguf: Path) -> str:
    """The name every entry of this GGUF path starts with."""
    return f"{gguf.stem}-{hashlib.sha256(str(gguf).encode()).hexdigest()[:8]}-"


def load(gguf: Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The config and tensors stored for this GGUF file, mapped read-only; None on a miss."""
    entry = entry_path(gguf)
    if entry is None or not entry.is_file():
        return None
    try:
        tensors, metadata = read_safetensors_with_metadata(entry, copy=False)
        config = json.loads(metadata["config"])
    except (WeightsError, KeyError, TypeError, ValueError, OSError) as e:
        warnings.warn(
            f"{entry}: unreadable converted weights ({e}); converting {gguf} again",
            stacklevel=2,
        )
        entry.unlink(missing_ok=True)
        return None
    return config, tensors


def store(
    gguf: Path, config: dict, tensors: dict[str, np.ndarray], order: list[str]
) -> dict[str, np.ndarray]:
    """Write the tensors (in `order`, then the rest) and config for this GGUF file, and return
    the tensors mapped from what was written; the tensors as given where it cannot be written."""
    entry = entry_path(gguf)
    if entry is None:
        return tensors
    names = list(dict.fromkeys([n for n in order if n in tensors] + list(tensors)))
    header: dict = {"__metadata__": {"config": json.dumps(config), "source": str(gguf)}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {
            "dtype": "F32",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.size * 4],
        }
        offset += t.size * 4
    head = json.dumps(header).encode()
    head += b" " * (-(8 + len(head)) % ALIGN)  # spaces: the padding safetensors allows
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(entry.parent, _prefix(gguf.resolve()))
        free = shutil.disk_usage(entry.parent).free
        if free < offset + KEEP_FREE:
            raise OSError(
                f"{offset / 2**20:.0f} MiB would leave less than "
                f"{KEEP_FREE / 2**30:.0f} GiB of the disk's {free / 2**20:.0f} MiB free"
            )
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for name in names:
                f.write(np.ascontiguousarray(tensors[name], dtype="<f4").data)
        os.replace(tmp, entry)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        warnings.warn(
            f"{entry}: cannot store converted weights ({e}); loading without them. Set "
            f"{ENV} to a writable directory, or to off",
            stacklevel=2,
        )
        return tensors
    for old in entry.parent.glob(f"{_prefix(gguf.resolve())}*.safetensors"):
        if old != entry:
            old.unlink(missing_ok=True)
    return read_safetensors_with_metadata(entry, copy=False)[0]


def _remove_stale_temporaries(directory: Path, prefix: str) -> None:
    """Delete the temporary files of this GGUF that a killed process left (untouched for
    STALE seconds: a process still writing one touches it far more often)."""
    now = time.time()
    for tmp in directory.glob(f".{prefix}*.tmp"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE:
                tmp.unlink()
