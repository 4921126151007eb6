"""nanovllm: a small, readable LLM inference engine on the Python array API standard."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
]

if TYPE_CHECKING:
    from .llm import LLM
    from .outputs import CompletionOutput, Logprob, RequestOutput
    from .sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str):
    # Lazy, so that `import nanovllm.engine.scheduler` pulls in no array library.
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputsParams"):
        from . import sampling_params

        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput", "Logprob"):
        from . import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")
