"""python -m nanovllm bench: offline throughput in the manner of nano-vllm's bench.py, CPU-sized.

Three scenarios: batch-1 decode, one long prefill, and N concurrent requests with random input
and output lengths (ignore_eos). Each is repeated and the median reported. `--backend
numpy,jax` loads both and interleaves their runs, then prints each one's ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

from .cli import add_model_args, make_llm
from .sampling_params import SamplingParams


def blas_kernel() -> str:
    """numpy's BLAS and the kernel it picked for this CPU (threadpoolctl's `architecture`)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (pip install threadpoolctl)"
    import numpy  # noqa: F401  (loads the BLAS threadpoolctl looks for)

    infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return (
        ", ".join(f"{i['internal_api']} {i.get('architecture')} x{i['num_threads']}" for i in infos)
        or "none found"
    )


def run_requests(llm, prompts: list[list[int]], outputs: list[int]) -> dict:
    """Runs the requests to completion through engine.step(), timing every step.

    A step's time is split between prefill and decode in proportion to its tokens of each.
    """
    engine = llm.engine
    start = time.perf_counter()
    for p, n in zip(prompts, outputs):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    first: dict[str, float] = {}
    prefill_time = decode_time = 0.0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        p_tok, d_tok = engine.last_step_tokens
        prefill_time += (now - t0) * p_tok / (p_tok + d_tok)
        decode_time += (now - t0) * d_tok / (p_tok + d_tok)
        for o in outs:
            if o.outputs[0].token_ids and o.request_id not in first:
                first[o.request_id] = now - start
    total = time.perf_counter() - start
    n_in, n_out = sum(map(len, prompts)), sum(outputs)
    return {
        "total_tok_s": (n_in + n_out) / total,
        "prefill_tok_s": n_in / prefill_time,
        "decode_tok_s": n_out / decode_time,
        "ttft_median_s": statistics.median(first.values()),
    }


def prefill_tok_s(llm, prompt: list[int]) -> float:
    """One prompt computed and a first token sampled: prompt tokens per second."""
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return len(prompt) / (time.perf_counter() - t0)


class Workload:
    """Random token ids from one seeded generator, so that two engines get the same ones."""

    def __init__(self, seed: int, vocab_size: int):
        self.rng = np.random.default_rng(seed)
        self.vocab = min(vocab_size, 30000)

    def tokens(self, n: int) -> list[int]:
        return self.rng.integers(100, self.vocab, size=n).tolist()

    def requests(
        self, num: int, input_len: tuple[int, int], output_len: tuple[int, int]
    ) -> tuple[list[list[int]], list[int]]:
        """Prompts and output lengths drawn uniformly from the inclusive ranges."""
        lengths = self.rng.integers(input_len[0], input_len[1] + 1, size=num)
        prompts = [self.tokens(int(n)) for n in lengths]
        outputs = self.rng.integers(output_len[0], output_len[1] + 1, size=num)
        return prompts, [int(n) for n in outputs]


def decode_tok_s(llm, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode speed: the tokens after the first over the time after the first."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine = llm.engine
    engine.add_request(prompt, params)
    engine.step()
    t_first = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (new_tokens - 1) / (time.perf_counter() - t_first)


def main(argv: list[str]) -> None:
    import copy

    p = argparse.ArgumentParser(prog="python -m nanovllm bench", description=__doc__)
    add_model_args(p, backend_help="; several, comma-separated (numpy,jax), run interleaved")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument("--decode-tokens", type=int, default=64, help="batch-1 decode length")
    p.add_argument("--prefill-len", type=int, default=512, help="long-prompt prefill length")
    p.add_argument("--repeats", type=int, default=3, help="runs of each scenario (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    p.add_argument(
        "--vs-batch-invariant",
        action="store_true",
        help="load each backend also with --batch-invariant and give its ratios",
    )
    args = p.parse_args(argv)
    args.no_prefix_caching = True  # every run must compute its prompts
    # several engines (--backend numpy,jax) are loaded together and their runs interleaved,
    # so that each ratio compares figures taken under the same machine load
    llms, labels = [], []
    for name in args.backend.split(","):
        for invariant in sorted({args.batch_invariant, args.vs_batch_invariant}):
            one = copy.copy(args)
            one.backend, one.batch_invariant = name, invariant
            llms.append(make_llm(one))
            labels.append(name + (" batch_invariant" if invariant else ""))
    vocab = llms[0].model.vocab_size
    work = Workload(args.seed, vocab)
    prompts, outputs = work.requests(args.num_requests, args.input_len, args.output_len)
    for llm in llms:
        if llm.backend.jits:
            # a jitting backend compiles each new shape once: one untimed round first
            decode_tok_s(llm, work.tokens(32), args.decode_tokens)
            llm.generate(
                [work.tokens(args.prefill_len)], SamplingParams(max_tokens=1), use_tqdm=False
            )
            run_requests(llm, prompts, outputs)
        else:
            run_requests(llm, prompts[:2], [4, 4])
    runs: list[dict[str, list[Any]]] = [{"decode": [], "prefill": [], "batched": []} for _ in llms]
    for _ in range(args.repeats):
        decode_prompt, prefill_prompt = work.tokens(32), work.tokens(args.prefill_len)
        for llm, r in zip(llms, runs):
            r["decode"].append(decode_tok_s(llm, decode_prompt, args.decode_tokens))
            r["prefill"].append(prefill_tok_s(llm, prefill_prompt))
            r["batched"].append(run_requests(llm, prompts, outputs))
    med = statistics.median
    table = []
    for llm, label, r in zip(llms, labels, runs):
        figures = {
            "backend": label,
            "model": llm.model.__class__.__name__,
            "batch1_decode_tok_s": med(r["decode"]),
            f"prefill{args.prefill_len}_tok_s": med(r["prefill"]),
            "requests": args.num_requests,
            "batched_total_tok_s": med(x["total_tok_s"] for x in r["batched"]),
            "batched_prefill_tok_s": med(x["prefill_tok_s"] for x in r["batched"]),
            "batched_decode_tok_s": med(x["decode_tok_s"] for x in r["batched"]),
            "batched_ttft_median_s": med(x["ttft_median_s"] for x in r["batched"]),
        }
        if llm.backend.jits:
            figures["compilations"] = llm.backend.compilations()
        table.append(figures)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for figures in table:
        figures["blas"] = blas_kernel()
    if len(llms) == 1:
        table[0]["peak_rss_mib"] = peak
    if args.json:
        for figures in table:
            print(json.dumps(figures))
        return
    for figures in table:
        for k, v in figures.items():
            print(f"{k:>28}: {v:.2f}" if isinstance(v, float) else f"{k:>28}: {v}")
        print()
    if len(table) > 1:
        base = table[0]
        print(f"ratios to {base['backend']} (same run, interleaved):")
        for figures in table[1:]:
            ratios = ", ".join(
                f"{k} {figures[k] / base[k]:.2f}x" for k in base if k.endswith("tok_s")
            )
            print(f"  {figures['backend']}: {ratios}")
        print(f"peak RSS of the process (all backends): {peak:.0f} MiB")
    sys.stdout.flush()
