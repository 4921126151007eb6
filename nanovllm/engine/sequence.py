"""One request's life: WAITING -> RUNNING -> FINISHED (and back to WAITING when preempted)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

FINISH_REASONS = ("stop", "length", "abort", "error")


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: Any = None  # sampling parameters; opaque to the engine core
    index: int = 0  # which of the request's n samples this is
    use_prefix_cache: bool = True  # False when every prompt position must be computed
    max_tokens: int | None = None  # output tokens at most (speculation proposes no more)
    token_ids: list[int] = field(init=False, default_factory=list)  # prompt + generated
    status: SequenceStatus = field(init=False, default=SequenceStatus.WAITING)
    num_computed_tokens: int = field(init=False, default=0)  # tokens whose K/V is in the cache
    num_cached_tokens: int = field(init=False, default=0)  # of those, taken from the prefix cache
    block_table: list[int] = field(init=False, default_factory=list)
    block_hashes: list[bytes] = field(init=False, default_factory=list)  # of full blocks, lazily
    finish_reason: str | None = field(init=False, default=None)
    state_slot: int | None = field(init=False, default=None)
    num_preemptions: int = field(init=False, default=0)
    # speculative decoding: proposals rejected whole in a row, and decode steps left before
    # the next proposal (a miss costs a verification of several rows for one token)
    spec_misses: int = field(init=False, default=0)
    spec_skip: int = field(init=False, default=0)
    # structured outputs: the grammar matcher of this sample, advanced with each of its tokens
    # (opaque here; see nanovllm/structured_outputs.py). It survives preemption as is: the
    # tokens it has consumed are kept and recomputed, never sampled again.
    matcher: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(
                f"request {self.request_id!r} has an empty prompt; pass at least one token"
            )
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
