"""llguidance (what nanovllm uses) against xgrammar, on the default model's vocabulary.

    pip install xgrammar && python benchmarks/grammar_backends.py [--repeats 5]

For each library: building its view of the tokenizer, compiling a small JSON schema and a
300-property one, and one decode step's masks for 16 sequences (each matcher is walked along
the same valid answer, and every step fills all 16 masks). Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from nanovllm.bench import blas_kernel
from nanovllm.loader import load_model
from nanovllm.structured_outputs import GrammarCompiler, fill_bitmask

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
NAMES = [f"field_{i}" for i in range(300)]
WIDE = {
    "type": "object",
    "properties": {n: {"type": "string", "pattern": "[a-z]{1,20}"} for n in NAMES},
    "required": NAMES,
}
ANSWER = '{"name": "Ada Lovelace", "age": 36}'
BATCH = 16


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def llguidance_figures(tokenizer, vocab: int, eos: list[int], answer: list[int]) -> dict:
    from nanovllm.sampling_params import StructuredOutputsParams

    compiler = GrammarCompiler(tokenizer, vocab, eos)
    figures = {"tokenizer_s": timed(compiler.llg_tokenizer)[0]}
    for name, schema in (("small", PERSON), ("wide", WIDE)):
        compiler._grammars.clear()
        seconds, grammar = timed(lambda s=schema: compiler.grammar(StructuredOutputsParams(json=s)))
        figures[f"compile_{name}_s"] = seconds + timed(lambda g=grammar: compiler.matcher(g))[0]
    grammar = compiler.grammar(StructuredOutputsParams(json=PERSON))
    matchers = [compiler.matcher(grammar) for _ in range(BATCH)]
    work = [(m, i, []) for i, m in enumerate(matchers)]
    steps = []
    for token in answer:
        steps.append(timed(lambda: fill_bitmask(work, BATCH, vocab))[0])
        for m in matchers:
            assert m.consume_token(token), m.get_error()
    figures["mask_step_16_ms"] = 1000 * statistics.median(steps)
    return figures


def xgrammar_figures(tokenizer, vocab: int, eos: list[int], answer: list[int]) -> dict:
    import xgrammar as xgr

    def info():
        by_id = {i: t for t, i in tokenizer.tokenizer.get_vocab(with_added_tokens=True).items()}
        encoded = [by_id.get(i, "") for i in range(vocab)]
        return xgr.TokenizerInfo(
            encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=eos
        )

    seconds, tok_info = timed(info)
    figures = {"tokenizer_s": seconds}
    compiler = xgr.GrammarCompiler(tok_info, cache_enabled=False)
    for name, schema in (("small", PERSON), ("wide", WIDE)):
        figures[f"compile_{name}_s"] = timed(lambda s=schema: compiler.compile_json_schema(
            json.dumps(s)))[0]  # fmt: skip
    compiled = compiler.compile_json_schema(json.dumps(PERSON))
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = xgr.allocate_token_bitmask(BATCH, vocab)
    steps = []
    for token in answer:

        def fill():
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(bitmask, i)

        steps.append(timed(fill)[0])
        for m in matchers:
            assert m.accept_token(token)
    figures["mask_step_16_ms"] = 1000 * statistics.median(steps)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from nanovllm.backend import get_backend

    loaded = load_model(None, get_backend("numpy"))
    tokenizer, vocab, eos = loaded.tokenizer, loaded.model.vocab_size, loaded.eos_token_ids
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    runs: dict[str, list[dict]] = {"llguidance": [], "xgrammar": []}
    for _ in range(args.repeats):
        runs["llguidance"].append(llguidance_figures(tokenizer, vocab, eos, answer))
        runs["xgrammar"].append(xgrammar_figures(tokenizer, vocab, eos, answer))
    table = {
        lib: {k: round(statistics.median(r[k] for r in rs), 4) for k in rs[0]}
        for lib, rs in runs.items()
    }
    table["cpu"] = blas_kernel()  # type: ignore[assignment]
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
