"""Structured outputs: a request's constraint compiled to a grammar, one matcher per sample,
and each step's allowed tokens as a packed bitmask, all through llguidance.

The grammar's view of the vocabulary is built once per model, from our `tokenizers`
tokenizer (GGUF models included: theirs is built from the file's metadata). The engine keeps
a matcher on each constrained sequence and advances it with every sampled token; the runner
asks the step's matchers for their masks (`fill_bitmask`) and the sampler applies them.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

from .errors import InvalidRequestError
from .sampling_params import StructuredOutputsParams


def limits() -> llguidance.LLParserLimits:
    """Bounds on the grammar compiler's work: a schema or grammar past them is rejected at
    once, so a pathological one cannot hang the engine (llguidance's defaults, but a smaller
    grammar)."""
    return llguidance.LLParserLimits(
        max_grammar_size=200_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000
    )


COMPILE_TIMEOUT_S = 10.0  # a constraint that takes longer to check is refused
CACHED_GRAMMARS = 256  # the most recent distinct constraints kept compiled (a server sees many)


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a packed mask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles constraints against one model's tokenizer; hands out fresh matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = tokenizer.tokenizer  # a `tokenizers.Tokenizer`
        self.vocab_size, self.eos_token_ids = vocab_size, list(eos_token_ids)
        self._tokenizer: Any = None  # the LLTokenizer: built on first use (~0.3 s)
        self._grammars: OrderedDict[str, str] = OrderedDict()  # constraint -> checked grammar
        self._lock = threading.Lock()

    def llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(
                    self._hf_tokenizer.to_str(),
                    n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids or None,
                )
            return self._tokenizer

    def grammar(self, constraint: StructuredOutputsParams) -> str:
        """The llguidance grammar of a constraint, checked; InvalidRequestError naming the
        problem when the schema, regex or grammar is invalid or too large."""
        kind = constraint.kind()
        value = getattr(constraint, kind)
        key = json.dumps([kind, value], sort_keys=True)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        try:
            if kind == "json":
                schema = json.loads(value) if isinstance(value, str) else value
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
            elif kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
            elif kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(value)
            elif kind == "choice":  # each option a JSON-quoted Lark literal
                options = " | ".join(json.dumps(c) for c in value)
                grammar = llguidance.LLMatcher.grammar_from_lark(f"start: {options}")
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(value)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(
                f"structured_outputs.{kind} is not valid: {e}; pass a valid {kind}"
            ) from None
        error = self._validate(grammar, kind)
        if error:
            raise InvalidRequestError(
                f"structured_outputs.{kind} cannot be used: {error.strip()}; fix the {kind}"
            )
        with self._lock:
            self._grammars[key] = grammar
            while len(self._grammars) > CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return grammar

    def _validate(self, grammar: str, kind: str) -> str:
        """llguidance's verdict on a grammar ("" when valid), within COMPILE_TIMEOUT_S: the
        check runs in a thread of its own (it releases the GIL) and a slow one is refused
        (the thread is left to finish in the background; the request is not kept waiting)."""
        tokenizer = self.llg_tokenizer()
        verdict: dict[str, str] = {}
        thread = threading.Thread(
            target=lambda: verdict.update(
                error=llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=limits())
            ),
            daemon=True,
        )
        thread.start()
        thread.join(COMPILE_TIMEOUT_S)
        if "error" not in verdict:
            raise InvalidRequestError(
                f"structured_outputs.{kind} did not compile within {COMPILE_TIMEOUT_S:g} s; "
                f"simplify the {kind}"
            )
        return verdict["error"]

    def matcher(self, grammar: str):
        m = llguidance.LLMatcher(self.llg_tokenizer(), grammar, log_level=0, limits=limits())
        if m.is_error():
            raise InvalidRequestError(f"the structured output's grammar failed: {m.get_error()}")
        return m


_executor: Any = None  # llguidance's thread pool for filling masks, made on first use


def fill_bitmask(work: list[tuple], rows: int, vocab_size: int) -> np.ndarray:
    """[rows, bitmask_width(vocab_size)] int32 masks from `work`, (matcher, row, proposals)
    triples: row `row` packs the tokens the matcher allows now (bit t % 32 of word t // 32),
    and row `row + j` those it would allow after the first j proposals (speculative
    decoding; the matcher itself is left as it was). Other rows allow every token."""
    global _executor
    mask = np.full((rows, bitmask_width(vocab_size)), -1, dtype=np.int32)
    if work:
        if _executor is None:
            _executor = llguidance.LLExecutor()
        # llguidance takes rows with proposals (which must be non-empty) and without apart
        drafted = [(m, i, list(d)) for m, i, d in work if d]
        plain = [(m, i) for m, i, d in work if not d]
        if drafted:
            llg_numpy.fill_next_token_bitmask_par_with_draft_tokens(_executor, drafted, mask)
        if plain:
            llg_numpy.fill_next_token_bitmask_par(_executor, plain, mask)
    return mask
