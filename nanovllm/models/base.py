"""What every model shares: config reading and the check of a checkpoint's tensors."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedFeatureError, WeightsError


def require(config: dict, key: str, source: str = "config.json") -> Any:
    if key not in config:
        raise ValueError(f"{source} has no {key!r}, which this architecture needs")
    return config[key]


def check_tensors(expected: dict[str, tuple[int, ...]], optional: set[str],
                  tensors: dict[str, Any], source: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + "; the checkpoint does not match its config.json")
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]!r}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                           + "; the checkpoint does not match its config.json architecture")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise WeightsError(f"{source}: tensor {name!r} has shape {got}, expected "
                               f"{tuple(shape)} from config.json")


__all__ = ["UnsupportedFeatureError", "check_tensors", "require"]
