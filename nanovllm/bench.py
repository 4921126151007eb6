"""python -m nanovllm bench: offline throughput in the manner of nano-vllm's bench.py, CPU-sized.

Three scenarios: batch-1 decode, one long prefill, and N concurrent requests with random input
and output lengths (ignore_eos). Each is repeated and the median reported. `--backend
numpy,jax` loads both and interleaves their runs, then prints each one's ratio to the first.

Also per engine: batch-1 decode at a long context against a short one (`--long-context`), the
time to first token of a request whose long prefix an earlier one computed, against the same
request cold (`--shared-prefix`), and the decode roofline: the bytes one batch-1 decode step
must read (weights and KV), over the matrix-vector bandwidth measured on this machine. And
batch-1 chats with and without speculative decoding (bench_speculative.py).
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

from .bench_speculative import speculative_rows
from .cli import add_model_args, make_llm
from .config import SpeculativeConfig
from .models.base import linear_weights
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
    while not any(out.outputs[0].token_ids for out in engine.step()):
        pass  # the prompt, in as many chunks as it takes, up to the first token
    t_first = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return (new_tokens - 1) / (time.perf_counter() - t_first)


def gemv_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes per second numpy streams through a float32 matrix-vector product over a matrix of
    about `nbytes`: the rate a batch-1 decode reads its weights at best. Sized as the decode
    step's own reads, because the rate depends on where the matrix lies: a machine whose last
    level cache holds a small matrix (some hold hundreds of MiB) streams it far faster than
    the weights of a whole step, which come from memory."""
    cols = 4096
    w = np.ones((max(nbytes // (4 * cols), 1), cols), dtype=np.float32)
    x = np.ones(cols, dtype=np.float32)
    w @ x  # once untimed: the pages are touched and the threads started
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - t0)
    return w.nbytes / statistics.median(times)


def param_arrays(tree, skip: tuple[str, ...] = ()):
    """The arrays of a model's parameter tree (dicts, lists, tuples), leaving out the entries
    of dicts whose key is in `skip`."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k not in skip:
                yield from param_arrays(v, skip)
    elif isinstance(tree, list | tuple):
        for v in tree:
            yield from param_arrays(v, skip)
    elif tree is not None and hasattr(tree, "shape"):
        yield tree


def products_weights(llm, head: bool = True) -> list:
    """The model's linear weights as its products multiply by them (the output head among
    them unless `head` is False); [] on a jitting backend, whose products are not taken one
    by one."""
    if llm.backend.jits:
        return []
    weights = linear_weights(llm.model)
    return [w for w in weights if head or w.shape[1] != llm.model.vocab_size]


def products_s(llm, weights: list, rows: int, repeats: int = 5, product=None) -> float:
    """Median seconds of `rows` rows times each weight in turn, as a step of that many rows
    multiplies them, with nothing else in between (`product(x, w)`: another way to take each
    product than the backend's `x @ w`)."""
    product = product or (lambda x, w: x @ w)
    b = llm.backend
    xs = {k: b.asarray(np.ones((rows, k)), dtype=b.dtype) for k in {w.shape[0] for w in weights}}
    times = []
    with b.inference():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in weights:
                product(xs[w.shape[0]], w)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weights_gemv_bandwidth(llm) -> float | None:
    """Bytes per second of one row times each of the model's linear weights in turn, as a
    batch-1 decode step multiplies them and nothing else: what the decode's products reach on
    these shapes (small matrices cost each product a start-up), against `gemv_bandwidth`'s
    one large matrix. None on a jitting backend."""
    p = linear_products(llm, 1, head=True)
    return None if p is None else p["gb_s"] * 1e9


def linear_products(llm, rows: int, head: bool) -> dict | None:
    """What the products of a step of `rows` rows take alone on the model's own weights (None
    on a jitting backend): seconds, GFLOP/s, the weights' bytes per second, and the tokens per
    second a step of that many rows could reach if it did nothing else, which bounds a batched
    decode (`rows` sequences, with the head) and a prefill chunk (`rows` tokens, without it:
    its head reads the last row only)."""
    weights = products_weights(llm, head)
    if not weights:
        return None
    seconds = products_s(llm, weights, rows)
    params = sum(w.shape[0] * w.shape[1] for w in weights)
    return {
        "rows": rows,
        "s": seconds,
        "gflop_s": 2 * rows * params / seconds / 1e9,
        "gb_s": params * llm.backend.itemsize / seconds / 1e9,
        "tok_s": rows / seconds,
    }


def decode_step_bytes(llm, context: int) -> int:
    """What one batch-1 decode step reads: every weight once (the embedding: one row) and the
    K/V of `context` tokens."""
    itemsize, m = llm.backend.itemsize, llm.model
    skip = ("embed",) if "lm_head" in m.params else ()  # (a tied head is read whole)
    total = sum(int(np.prod(x.shape)) * itemsize for x in param_arrays(m.params, skip))
    kv = 2 * max(m.num_kv_layers, 1) * m.num_kv_heads * m.head_dim * itemsize * context
    return total + kv


def ttft_s(llm, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - t0


def shared_prefix_ttft(llm, prefix: list[int], suffix: list[int]) -> tuple[float, float]:
    """(cold, hot): the time to first token of prefix + suffix with nothing cached, and again
    after another request with the same prefix computed it. The bench's engines run with
    prefix caching off (each repeat reuses its prompts); it is on for this measurement only
    (the scheduler reads the flag at each admission)."""
    config = llm.config
    config.enable_prefix_caching = True
    try:
        cold = ttft_s(llm, prefix + suffix)
        hot = ttft_s(llm, prefix + suffix[::-1])  # another request, same prefix
    finally:
        config.enable_prefix_caching = False
    return cold, hot


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
    p.add_argument(
        "--long-context", type=int, default=4096,
        help="context of a long batch-1 decode, against a 128-token one (0 skips it)",
    )  # fmt: skip
    p.add_argument(
        "--shared-prefix", type=int, default=1024,
        help="prefix length of the hot/cold time-to-first-token pair (0 skips it)",
    )  # fmt: skip
    p.add_argument(
        "--spec-tokens", type=int, default=256,
        help="greedy tokens of each speculative-decoding chat, with and without speculation "
        "as --speculative-config gives it (default: ngram, 4 tokens); 0 skips them",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON lines")
    p.add_argument(
        "--vs-batch-invariant",
        action="store_true",
        help="load each backend also with --batch-invariant and give its ratios",
    )
    args = p.parse_args(argv)
    args.no_prefix_caching = True  # every run must compute its prompts
    # the engines decode plainly; the speculative rows turn it on for their own runs
    spec = SpeculativeConfig.parse(args.speculative_config) or SpeculativeConfig()
    args.speculative_config = None
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
    short_context = min(128, args.long_context // 2)  # the long decode's reference
    runs: list[dict[str, list[Any]]] = [
        {"decode": [], "prefill": [], "batched": [], "short": [], "long": [], "cold": [], "hot": []}
        for _ in llms
    ]
    for _ in range(args.repeats):
        decode_prompt, prefill_prompt = work.tokens(32), work.tokens(args.prefill_len)
        short, long = work.tokens(short_context), work.tokens(args.long_context)
        prefix, suffix = work.tokens(args.shared_prefix), work.tokens(16)
        for llm, r in zip(llms, runs):
            r["decode"].append(decode_tok_s(llm, decode_prompt, args.decode_tokens))
            r["prefill"].append(prefill_tok_s(llm, prefill_prompt))
            r["batched"].append(run_requests(llm, prompts, outputs))
            if args.long_context:
                r["short"].append(decode_tok_s(llm, short, args.decode_tokens))
                r["long"].append(decode_tok_s(llm, long, args.decode_tokens))
            if args.shared_prefix:
                cold, hot = shared_prefix_ttft(llm, prefix, suffix)
                r["cold"].append(cold)
                r["hot"].append(hot)
    step_bytes = [decode_step_bytes(llm, 32 + args.decode_tokens // 2) for llm in llms]
    bandwidth = gemv_bandwidth(max(step_bytes))
    med = statistics.median
    table = []
    for llm, label, r, nbytes in zip(llms, labels, runs, step_bytes):
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
        roofline = bandwidth / nbytes
        figures |= {
            "decode_roofline_tok_s": roofline,
            "decode_of_roofline": figures["batch1_decode_tok_s"] / roofline,
        }
        own = weights_gemv_bandwidth(llm)
        if own:  # the decode's products alone, on the model's own shapes
            figures["weights_gemv_gb_s"] = own / 1e9
        if args.long_context:
            figures |= {
                f"decode_ctx{short_context}_tok_s": med(r["short"]),
                f"decode_ctx{args.long_context}_tok_s": med(r["long"]),
                "long_over_short_decode": med(r["long"]) / med(r["short"]),
            }
        if args.shared_prefix:
            figures |= {
                f"ttft_prefix{args.shared_prefix}_cold_s": med(r["cold"]),
                f"ttft_prefix{args.shared_prefix}_hot_s": med(r["hot"]),
                "ttft_cold_over_hot": med(r["cold"]) / med(r["hot"]),
            }
        if args.spec_tokens:
            figures |= speculative_rows(llm, spec, args.repeats, args.spec_tokens)
        if llm.backend.jits:
            figures["compilations"] = llm.backend.compilations()
        table.append(figures)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for figures in table:
        figures["blas"] = blas_kernel()
        figures["gemv_gb_s"] = bandwidth / 1e9
    if len(llms) == 1:
        table[0]["peak_rss_mib"] = peak
    if args.json:
        for figures in table:
            print(json.dumps(figures))
        return
    for figures in table:
        for k, v in figures.items():
            print(f"{k:>34}: {v:.2f}" if isinstance(v, float) else f"{k:>34}: {v}")
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
