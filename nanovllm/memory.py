"""The host memory a load would take, checked against what the machine has before allocating."""

from __future__ import annotations

from .errors import OutOfMemoryError

GIB = float(1 << 30)


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(what: str, need: int, fix: str) -> None:
    """Raise before allocating `need` bytes when the machine does not have them free."""
    have = available_bytes()
    if have is not None and need > have:
        raise OutOfMemoryError(
            f"{what} would take {need / GIB:.1f} GiB, but only "
            f"{have / GIB:.1f} GiB of memory is available; {fix}"
        )
