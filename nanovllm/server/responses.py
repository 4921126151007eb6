"""Engine updates → OpenAI's response bodies and stream chunks, for completions and chat.

`Choices` follows every choice of one HTTP request. Text that a stop string could still cut
is held back until it is clear it stays, so the streamed deltas join to the final text.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..outputs import Logprob
from .engine_loop import ChoiceUpdate, Update


@dataclass(slots=True)
class Choice:
    index: int
    text: str = ""
    sent: int = 0  # characters of text already streamed
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class Delta:
    """What one update adds to one choice."""

    choice: Choice
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[dict[int, Logprob], ...]
    finish_reason: str | None


class Choices:
    def __init__(self, num_prompts: int, n: int, stop: list[str]):
        self.n = n
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.all = [Choice(i) for i in range(num_prompts * n)]

    def apply(self, prompt_index: int, update: Update) -> list[Delta]:
        deltas = []
        for c in update.choices:
            deltas.append(self._apply(self.all[prompt_index * self.n + c.index], c))
        return deltas

    def _apply(self, choice: Choice, c: ChoiceUpdate) -> Delta:
        choice.text = c.text
        choice.token_ids.extend(c.new_token_ids)
        choice.logprobs.extend(c.new_logprobs or ())
        choice.finish_reason, choice.stop_reason = c.finish_reason, c.stop_reason
        upto = len(c.text) if c.finish_reason else max(choice.sent, len(c.text) - self.hold)
        text = c.text[choice.sent : upto]
        choice.sent = max(choice.sent, upto)
        return Delta(choice, text, c.new_token_ids, c.new_logprobs or (), c.finish_reason)

    def usage(self, prompt_tokens: int) -> dict:
        completion = sum(len(c.token_ids) for c in self.all)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ---- logprobs in OpenAI's two shapes ---------------------------------------------------------


def finite(logprob: float) -> float:
    """-inf is not JSON: clamp as vLLM does."""
    return max(logprob, -9999.0)


def top_entries(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(
        ((t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k),
        key=lambda item: item[1].rank or 0,
    )  # (None was filtered out)


def completion_logprobs(token_ids, logprobs, k: int, offset: int) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset.
    `logprobs` may hold None (the first prompt token, with echo)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entries in zip(token_ids, logprobs):
        text = entries[token].decoded_token if entries else None
        if text is None:
            text = ""
        out["tokens"].append(text)
        out["token_logprobs"].append(finite(entries[token].logprob) if entries else None)
        out["top_logprobs"].append(
            {lp.decoded_token: finite(lp.logprob) for _, lp in top_entries(entries, k)}
            if entries
            else None
        )
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_ids, logprobs, k: int) -> dict:
    """The chat shape: content = [{token, logprob, bytes, top_logprobs}]."""

    def entry(lp: Logprob) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": finite(lp.logprob), "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(entries[token]),
                "top_logprobs": [entry(lp) for _, lp in top_entries(entries, k)],
            }
            for token, entries in zip(token_ids, logprobs)
        ]
    }


def prompt_logprobs_json(prompt_logprobs: list | None) -> list | None:
    """vLLM's extra prompt_logprobs: per prompt position None or {token id: {...}}."""
    if prompt_logprobs is None:
        return None
    return [
        None
        if entries is None
        else {
            str(t): {
                "logprob": finite(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for t, lp in entries.items()
        }
        for entries in prompt_logprobs
    ]
