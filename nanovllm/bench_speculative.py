"""The bench's speculative-decoding rows: batch-1 chats, with and without n-gram speculation,
interleaved on one engine (the scheduler reads `config.speculative` at every step).

Two input-grounded requests, where the answer quotes the prompt (a function renamed in a
piece of code, a passage quoted back), and one free one (a story), where proposals are rare
and speculation can only cost. Each row gives tok/s both ways, their ratio, whether the
greedy texts are identical, the share of proposed tokens accepted, and the tokens per step.
"""

from __future__ import annotations

import statistics
import time

from .config import SpeculativeConfig
from .sampling_params import SamplingParams

CODE = """import json


def load_orders(path):
    with open(path) as f:
        return json.load(f)


def compute_total(orders):
    total = 0
    for order in orders:
        if order["status"] == "paid":
            total += order["price"] * order["quantity"]
    return total


def report(path):
    orders = load_orders(path)
    print("orders:", len(orders))
    print("total:", compute_total(orders))
"""
PASSAGE = (
    "The lighthouse stood on a rock at the mouth of the bay. Every evening at dusk the keeper "
    "climbed its hundred and twelve steps, trimmed the wick and lit the lamp, and every "
    "morning at dawn he put it out again. Ships coming home from the north looked for its "
    "light long before they saw the coast, and sailors said that as long as it burned, no "
    "storm could keep them from the harbour. When the keeper grew old, his daughter took "
    "over the climb, and the light never once failed in forty years."
)
WORKLOADS = {
    "code_rename": f"Rename the function compute_total to paid_total in this code, and print "
    f"the whole code:\n\n{CODE}",
    "quote_passage": f"Copy the following passage exactly, word for word:\n\n{PASSAGE}",
    "free_story": "Write a short story about a dragon who learns to paint.",
}


def _chat(llm, prompt: str, max_tokens: int) -> tuple[float, list[int], str, int]:
    """(seconds per token, tokens, text, steps) of one greedy chat request run alone, from its first
    token on: the decode, which speculation speeds up (the prompt's prefill it does not)."""
    ids = llm.chat_prompt([{"role": "user", "content": prompt}])
    engine = llm.engine
    if len(ids) + max_tokens > llm.config.max_model_len:
        raise ValueError(
            f"the {len(ids)}-token prompt and {max_tokens} new tokens do not fit in "
            f"max_model_len={llm.config.max_model_len}; pass a smaller --spec-tokens"
        )
    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens))
    out = None
    while out is None or not out.outputs[0].token_ids:
        out = engine.step()[0]  # the prompt, up to the first token
    first, steps, t0 = len(out.outputs[0].token_ids), 0, time.perf_counter()
    while engine.has_unfinished_requests():
        out = engine.step()[0]
        steps += 1
    seconds = time.perf_counter() - t0
    tokens = out.outputs[0].token_ids
    return seconds / max(len(tokens) - first, 1), tokens, out.outputs[0].text, steps


def speculative_rows(llm, spec: SpeculativeConfig, repeats: int, max_tokens: int = 256) -> dict:
    """Per workload: plain and speculative tok/s (medians, interleaved), their ratio,
    identical text or not, accepted / proposed tokens, and output tokens per engine step."""
    if llm.tokenizer is None or llm.config.batch_invariant or llm.config.num_state_slots:
        return {}  # no chat, or an engine that cannot speculate
    config, sched = llm.config, llm.engine.scheduler
    figures: dict[str, float | bool] = {}
    for name, prompt in WORKLOADS.items():
        times: dict[str, list[float]] = {"plain": [], "spec": []}
        texts, steps = {}, {}
        drafted = accepted = 0
        for _ in range(repeats + 1):  # the first round warms up (and compiles, on jax)
            for mode in ("plain", "spec"):
                config.speculative = spec if mode == "spec" else None
                d0, a0 = sched.num_draft_tokens, sched.num_accepted_tokens
                try:
                    per_token, tokens, texts[mode], steps[mode] = _chat(llm, prompt, max_tokens)
                finally:
                    config.speculative = None
                times[mode].append(1 / per_token)
                if mode == "spec":
                    drafted += sched.num_draft_tokens - d0
                    accepted += sched.num_accepted_tokens - a0
        plain, fast = statistics.median(times["plain"][1:]), statistics.median(times["spec"][1:])
        figures |= {
            f"spec_{name}_plain_tok_s": plain,
            f"spec_{name}_spec_tok_s": fast,
            f"spec_{name}_speedup": fast / plain,
            f"spec_{name}_same_text": texts["plain"] == texts["spec"],
            f"spec_{name}_acceptance": accepted / drafted if drafted else 0.0,
            f"spec_{name}_tokens_per_step": (len(tokens) - 1) / max(steps["spec"], 1),
        }
    return figures
