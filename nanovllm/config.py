"""EngineConfig: every engine knob, validated in one place (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass

BATCH_INVARIANT_HYBRID = (
    "batch_invariant=True is not supported for models with Mamba layers (Granite 4.0-H): their "
    "chunked scan sums in an order set by where the prompt was cut into chunks; pass "
    "batch_invariant=False")


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int = 1024  # total, including the reserved null block 0
    enable_prefix_caching: bool = True
    num_state_slots: int = 0  # per-sequence recurrent state slots (hybrid models); 0 = off
    batch_invariant: bool = False  # a row's numbers do not depend on the rest of the step

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"{name}={value!r} must be a positive integer; pass {name}=1 or more")

        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "num_kv_blocks"):
            positive(name)
        usable = (self.num_kv_blocks - 1) * self.block_size
        if usable < self.max_model_len:
            need = -(-self.max_model_len // self.block_size) + 1
            raise ValueError(
                f"num_kv_blocks={self.num_kv_blocks} (block_size={self.block_size}) holds {usable} "
                f"tokens, fewer than one max_model_len={self.max_model_len} sequence; raise "
                f"num_kv_blocks to at least {need} or lower max_model_len")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                f"{self.max_num_seqs}, so a step can never decode every running sequence; raise "
                f"max_num_batched_tokens to at least {self.max_num_seqs} or lower max_num_seqs")
        if self.num_state_slots < 0:
            raise ValueError(f"num_state_slots={self.num_state_slots} must be >= 0")
        if self.num_state_slots and self.enable_prefix_caching:
            raise ValueError("enable_prefix_caching must be False when num_state_slots > 0: "
                             "a recurrent state cannot be reused at block boundaries")
        if self.batch_invariant and self.num_state_slots:
            raise ValueError(BATCH_INVARIANT_HYBRID)
