"""ServedModel: what the HTTP front end needs of a model, without its weights: the tokenizer and
chat template, and the sizes a request is checked against. It comes from the LLM in this
process, or (data parallelism) from a replica, which may run on another machine."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.llm_engine import check_prompt
from ..llm import validate_messages
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class ServedModel:
    path: str
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer | None

    @classmethod
    def of(cls, llm) -> ServedModel:
        return cls(str(llm.model_path), llm.config.max_model_len, llm.model.vocab_size,
                   llm.tokenizer)  # fmt: skip

    def chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """A conversation rendered with the chat template (the caller checked the tokenizer)."""
        assert self.tokenizer is not None
        validate_messages(messages)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def validate_prompt(self, ids: list[int]) -> None:
        check_prompt(ids, self.max_model_len, self.vocab_size)
