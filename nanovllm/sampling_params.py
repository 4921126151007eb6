"""SamplingParams: vLLM's fields and defaults, validated when built.

It is a mutable dataclass (as vLLM's): `validate()` runs again when a request is added, and
re-derives everything it normalizes, so a field changed after construction is never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_N = 4096  # samples per request: enough for sampling statistics, not a runaway
CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(slots=True)
class StructuredOutputsParams:
    """A constraint on the output, as vLLM's: exactly one of
    json (a JSON schema, as a dict or a string), regex, choice (a list of strings), grammar
    (a Lark grammar, llguidance's dialect) or json_object=True (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def kind(self) -> str:
        """The one constraint given; ValueError when none or several are."""
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"StructuredOutputsParams takes exactly one of {', '.join(CONSTRAINT_KINDS)}; "
                f"got {', '.join(given) if given else 'none'}"
            )
        return given[0]

    def validate(self) -> None:
        kind = self.kind()
        value = getattr(self, kind)
        ok = {
            "json": isinstance(value, dict | str),
            "regex": isinstance(value, str) and value != "",
            "choice": isinstance(value, list | tuple)
            and len(value) > 0
            and all(isinstance(c, str) and c for c in value),
            "grammar": isinstance(value, str) and value.strip() != "",
            "json_object": value is True,
        }[kind]
        if not ok:
            allowed = {
                "json": "a JSON schema (a dict, or a string holding one)",
                "regex": "a non-empty regular expression",
                "choice": "a non-empty list of non-empty strings",
                "grammar": "a non-empty Lark grammar",
                "json_object": "True",
            }[kind]
            raise ValueError(
                f"StructuredOutputsParams.{kind}={value!r} is invalid; allowed: {allowed}"
            )


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output
    _stop: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Check every field's type and range (ValueError naming the field), and normalize."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(
                f"SamplingParams.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}"
            )

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and v == v

        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer >= 1 and at most {MAX_N}")
        if not is_real(self.temperature) or not 0.0 <= self.temperature <= 1e4:
            raise bad("temperature", "0 (greedy) or a float in (0, 1e4]")
        if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "a float in (0, 1]")
        if self.top_k == -1:
            self.top_k = 0
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 1, or 0 / -1 for all tokens")
        if not is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "a float in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "a float in [-2, 2]")
        if not is_real(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise bad("repetition_penalty", "a float in (0, 100], 1 for none")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**63):
            raise bad("seed", "an integer in [-2**63, 2**63 - 1] or None")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1, or None for up to max_model_len")
        if (
            not is_int(self.min_tokens)
            or self.min_tokens < 0
            or (self.max_tokens is not None and self.min_tokens > self.max_tokens)
        ):
            raise bad("min_tokens", "an integer in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= 20):
                raise bad(name, "None or an integer in [0, 20]")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is not None and (
            not isinstance(stop, list | tuple) or any(not isinstance(s, str) or not s for s in stop)
        ):
            raise bad("stop", "a non-empty string or a list of non-empty strings")
        self._stop = list(stop or ())
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, list | tuple) or any(
            not is_int(t) or t < 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of non-negative token ids")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, dict)
            or any(not is_int(t) or t < 0 for t in self.logit_bias)
            or any(not is_real(v) or not -100.0 <= v <= 100.0 for v in self.logit_bias.values())
        ):
            raise bad("logit_bias", "a dict of non-negative token ids to floats in [-100, 100]")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise bad("structured_outputs", "a StructuredOutputsParams, or None")
            self.structured_outputs.validate()
