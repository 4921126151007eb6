"""EngineConfig: every engine knob, validated in one place, and the KV pool's sizing (pure
Python: the backend supplies the item size, the model its sizes)."""

from __future__ import annotations

from dataclasses import dataclass

BATCH_INVARIANT_HYBRID = (
    "batch_invariant=True is not supported for models with Mamba layers (Granite 4.0-H): their "
    "chunked scan sums in an order set by where the prompt was cut into chunks; pass "
    "batch_invariant=False"
)


SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
MAX_SPECULATIVE_TOKENS = 16  # more proposals per step than this cost more than they can win
NGRAM_DEFAULTS = (4, 4, 2)  # num_speculative_tokens, prompt_lookup_max, prompt_lookup_min


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding by n-gram prompt lookup (vLLM's `{"method": "ngram", ...}`): each
    decoding sequence proposes up to `num_speculative_tokens` tokens that followed the latest
    earlier occurrence of its last n tokens (prompt_lookup_max >= n >= prompt_lookup_min), and
    one step checks them all."""

    num_speculative_tokens: int = NGRAM_DEFAULTS[0]
    prompt_lookup_max: int = NGRAM_DEFAULTS[1]
    prompt_lookup_min: int = NGRAM_DEFAULTS[2]
    method: str = "ngram"

    @classmethod
    def parse(cls, value) -> SpeculativeConfig | None:
        """A SpeculativeConfig from a dict, a JSON string (the CLI's), one, or None (off)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(
                    f"speculative_config {value!r} is not JSON ({e}); pass e.g. "
                    '{"method": "ngram", "num_speculative_tokens": 4}'
                ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"speculative_config must be a dict, not {type(value).__name__}; pass e.g. "
                '{"method": "ngram", "num_speculative_tokens": 4}'
            )
        if "model" in value:
            raise ValueError(
                f"speculative_config model={value['model']!r}: a draft model is not supported; "
                'use {"method": "ngram"} (prompt lookup)'
            )
        unknown = sorted(set(value) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(
                f"speculative_config has unknown keys {unknown}; the keys are {list(SPEC_KEYS)}"
            )
        method = value.get("method", "ngram")
        if method != "ngram":
            raise ValueError(f"speculative_config method={method!r} is not supported; use 'ngram'")
        # one of the two lookup sizes given alone sets the other where the default would not fit
        k, n_max, n_min = NGRAM_DEFAULTS
        given_max, given_min = value.get("prompt_lookup_max"), value.get("prompt_lookup_min")
        if given_max is None and isinstance(given_min, int):
            n_max = max(n_max, given_min)
        if given_min is None and isinstance(given_max, int):
            n_min = min(n_min, given_max)
        config = cls(
            value.get("num_speculative_tokens", k),
            n_max if given_max is None else given_max,
            n_min if given_min is None else given_min,
        )
        config.validate()
        return config

    def validate(self) -> None:
        for name, limit in (
            ("num_speculative_tokens", MAX_SPECULATIVE_TOKENS),
            ("prompt_lookup_max", 1 << 10),
            ("prompt_lookup_min", 1 << 10),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ValueError(
                    f"speculative_config {name}={value!r} must be an integer in [1, {limit}]"
                )
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min={self.prompt_lookup_min} is above "
                f"prompt_lookup_max={self.prompt_lookup_max}; pass min <= max"
            )

    def describe(self) -> str:
        return (
            f"ngram speculation: {self.num_speculative_tokens} tokens, "
            f"lookup {self.prompt_lookup_min}-{self.prompt_lookup_max}"
        )


SPEC_HYBRID = (
    "speculative decoding is not supported for models with Mamba layers (Granite 4.0-H): a "
    "rejected proposal would leave its tokens in the recurrent state; pass "
    "speculative_config=None"
)
SPEC_BATCH_INVARIANT = (
    "speculative decoding is not supported with batch_invariant=True: its passes of fixed "
    "rows sample one row per sequence; pass one of the two"
)


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int = 1024  # total, including the reserved null block 0
    enable_prefix_caching: bool = True
    num_state_slots: int = 0  # per-sequence recurrent state slots (hybrid models); 0 = off
    # hybrid models: slots for states saved at block boundaries, so that their prefix cache
    # can resume (engine/state_snapshots.py); prefix caching needs at least one
    num_state_snapshots: int = 0
    batch_invariant: bool = False  # a row's numbers do not depend on the rest of the step
    # every layer's queries see at most this many keys (None: some layer sees all): a
    # sequence's blocks that fall out of it are freed while it runs
    sliding_window: int | None = None
    speculative: SpeculativeConfig | None = None  # n-gram speculative decoding; None: off

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"{name}={value!r} must be a positive integer; pass {name}=1 or more"
                )

        for name in (
            "block_size",
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "num_kv_blocks",
        ):
            positive(name)
        usable = (self.num_kv_blocks - 1) * self.block_size
        if usable < self.max_model_len:
            need = -(-self.max_model_len // self.block_size) + 1
            raise ValueError(
                f"num_kv_blocks={self.num_kv_blocks} (block_size={self.block_size}) holds {usable} "
                f"tokens, fewer than one max_model_len={self.max_model_len} sequence; raise "
                f"num_kv_blocks to at least {need} or lower max_model_len"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                f"{self.max_num_seqs}, so a step can never decode every running sequence; raise "
                f"max_num_batched_tokens to at least {self.max_num_seqs} or lower max_num_seqs"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window={self.sliding_window} must be positive or None")
        for name in ("num_state_slots", "num_state_snapshots"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if self.num_state_slots and self.enable_prefix_caching and not self.num_state_snapshots:
            raise ValueError(
                "enable_prefix_caching=True with recurrent state (num_state_slots > 0) needs "
                "num_state_snapshots >= 1: a cached prefix resumes only from a saved state; "
                "pass num_state_snapshots=1 or more, or enable_prefix_caching=False"
            )
        if self.num_state_snapshots and not (self.num_state_slots and self.enable_prefix_caching):
            raise ValueError(
                f"num_state_snapshots={self.num_state_snapshots} is for a hybrid model's prefix "
                "cache: it needs num_state_slots > 0 and enable_prefix_caching=True; pass "
                "num_state_snapshots=0"
            )
        if self.batch_invariant and self.num_state_slots:
            raise ValueError(BATCH_INVARIANT_HYBRID)
        if self.speculative is not None:
            self.speculative.validate()
            if self.num_state_slots:
                raise ValueError(SPEC_HYBRID)
            if self.batch_invariant:
                raise ValueError(SPEC_BATCH_INVARIANT)


def all_layers_window(layer_windows: tuple[int | None, ...]) -> int | None:
    """The number of keys every layer's queries see at most (the widest window), or None when
    some layer attends to the whole context (or no layer slides)."""
    if not layer_windows or any(w is None for w in layer_windows):
        return None
    return max(w for w in layer_windows if w is not None)


DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes for the KV pool when neither it nor the blocks are given


def kv_cache_bytes_per_block(model, block_size: int, itemsize: int) -> int:
    """Bytes of one KV block: K and V of `block_size` tokens in every attention layer."""
    layers = max(model.num_kv_layers, 1)  # hybrid: attention layers only
    return 2 * layers * block_size * model.num_kv_heads * model.head_dim * itemsize


def size_kv_cache(
    per_block: int,
    block_size: int,
    model_max_len: int,
    max_model_len: int | None,
    max_num_seqs: int,
    num_kv_blocks: int | None,
    kv_cache_memory: int | None,
) -> tuple[int, int]:
    """(num_kv_blocks, max_model_len) from what the user gave and the model's limit.

    Given blocks are taken as they are. Otherwise the pool gets what `kv_cache_memory` (1 GiB
    by default) holds, but no more than every sequence at full length needs, and at least two
    blocks (the null block and one). max_model_len defaults to what the model and pool allow."""
    if max_model_len is not None and max_model_len > model_max_len:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's "
            f"max_position_embeddings={model_max_len}; pass at most {model_max_len}"
        )
    blocks = num_kv_blocks
    if blocks is None:
        budget = DEFAULT_KV_CACHE_MEMORY if kv_cache_memory is None else kv_cache_memory
        wanted_len = max_model_len or model_max_len
        needed = max_num_seqs * -(-wanted_len // block_size) + 1
        blocks = min(max(budget // per_block, 2), needed)
    return blocks, max_model_len or min(model_max_len, (blocks - 1) * block_size)
