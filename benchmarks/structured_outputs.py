"""Decode step time of 16 sequences under a JSON-schema constraint against 16 free ones.

    python benchmarks/structured_outputs.py [--repeats 3] [--backend numpy]

Both batches decode the same prompts for the same number of steps (the schema asks for a long
array, so no constrained sequence finishes early; the free ones ignore EOS). Each repeat runs
both, alternating which goes first; the figure is the median time of a decode step (every row
a decode), and the ratio constrained / free. The constrained step includes filling the
16 masks with llguidance and applying them in the sampler.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from nanovllm import LLM, SamplingParams, StructuredOutputsParams
from nanovllm.bench import blas_kernel

LONG_ARRAY = {
    "type": "array",
    "items": {"type": "string", "minLength": 3},
    "minItems": 60,
}


def decode_step_times(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[float]:
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    times = []
    while engine.requests:
        decode = not engine.scheduler.waiting and all(
            s.num_computed_tokens == s.num_tokens - 1 for s in engine.scheduler.running
        )
        t = time.perf_counter()
        engine.step()
        if decode and len(engine.scheduler.running) == len(prompts):
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--steps", type=int, default=48, help="new tokens per sequence (48)")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    llm = LLM(backend=args.backend, verbose=False, enable_prefix_caching=False)
    prompts = [
        llm.chat_prompt([{"role": "user", "content": f"List {20 + i} fruits as a JSON array."}])
        for i in range(args.batch)
    ]
    free = SamplingParams(temperature=0.8, seed=0, max_tokens=args.steps, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0.8, seed=0, max_tokens=args.steps,
        structured_outputs=StructuredOutputsParams(json=LONG_ARRAY),
    )  # fmt: skip
    decode_step_times(llm, prompts[:2], constrained)  # warm-up: compiles, builds the tokenizer
    runs: dict[str, list[float]] = {"free": [], "constrained": []}
    for r in range(args.repeats):
        order = ["free", "constrained"] if r % 2 == 0 else ["constrained", "free"]
        for name in order:
            times = decode_step_times(llm, prompts, free if name == "free" else constrained)
            runs[name].append(statistics.median(times))
    free_s, constrained_s = (statistics.median(runs[k]) for k in ("free", "constrained"))
    print(json.dumps({
        "backend": args.backend, "batch": args.batch, "blas_kernel": blas_kernel(),
        "free_decode_step_ms": round(1000 * free_s, 2),
        "constrained_decode_step_ms": round(1000 * constrained_s, 2),
        "ratio": round(constrained_s / free_s, 3), "repeats": args.repeats,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
