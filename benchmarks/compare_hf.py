#!/usr/bin/env python
"""nanovllm (numpy and torch backends) against Hugging Face transformers (torch, CPU), in one
process.

The engines load the same model in float32 and run the same workloads on the same token ids
(random ids from a seeded numpy rng), interleaved repeat by repeat, so that a shared machine's
changing load falls on all alike. The table gives each figure for every engine and the ratios
nanovllm / transformers (> 1: nanovllm is faster); a second table gives nanovllm's own rows
(the decode roofline, long context, prefix cache). See benchmarks/README.md.

    python benchmarks/compare_hf.py                  # default model, 3 repeats (median)
    python benchmarks/compare_hf.py --backends numpy # nanovllm on numpy only
    python benchmarks/compare_hf.py --repeats 1
    python benchmarks/compare_hf.py --model DIR      # a Hugging Face safetensors directory
    python benchmarks/compare_hf.py --json           # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def log(msg: str) -> None:
    print(f"[compare_hf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- model and environment -----------------------------------------------------------------
def resolve_model(model: str | None) -> tuple[Path, Path, str | None]:
    """-> (what nanovllm loads, the directory transformers loads, the GGUF file name or None)."""
    if model is None:
        from nanovllm.weights.default_model import default_model_path

        path = default_model_path()
    else:
        path = Path(model).expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return path, path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, path, None
    raise SystemExit(
        f"--model {model!r}: expected a Hugging Face model directory (config.json "
        f"+ *.safetensors) or a .gguf file"
    )


def blas_info() -> dict:
    """numpy's BLAS: threadpoolctl's view when it is installed, else numpy's build info."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        info = {"source": "numpy.show_config (threadpoolctl not installed)"}
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            info.update(
                name=blas.get("name"),
                version=blas.get("version"),
                config=blas.get("openblas configuration"),
            )
        except Exception as e:  # numpy < 2 or an unusual build
            info["error"] = repr(e)
        return info
    pools = [
        p
        for p in threadpool_info()
        if "numpy" in p.get("filepath", "") or p.get("user_api") == "blas"
    ]
    return {
        "source": "threadpoolctl",
        "pools": [
            {
                k: p.get(k)
                for k in (
                    "internal_api",
                    "version",
                    "num_threads",
                    "threading_layer",
                    "architecture",
                    "filepath",
                )
            }
            for p in pools
        ],
    }


def environment(torch) -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy_blas": blas_info(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }


# ---- transformers workloads ----------------------------------------------------------------
def load_hf(hf_dir: Path, gguf_name: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_name} if gguf_name else {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, **kw)
    model.eval()
    gc = model.generation_config  # greedy, and no sampling knobs left over to warn about
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    return model, time.perf_counter() - t0


def hf_pad_id(model) -> int:
    for v in (
        model.generation_config.pad_token_id,
        model.config.pad_token_id,
        model.generation_config.eos_token_id,
    ):
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


class FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives (put #2; put #1 is
    the prompt)."""

    def __init__(self):
        self.calls, self.t_first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.t_first = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(model, batch: list[list[int]], new_tokens: int, streamer=None):
    """Greedy generate of exactly `new_tokens` for every row, prompts left-padded."""
    import torch

    pad = hf_pad_id(model)
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad,
            streamer=streamer,
        )
    assert out.shape == (len(batch), width + new_tokens), out.shape
    return out


def hf_decode_tok_s(model, prompt: list[int], new_tokens: int) -> float:
    clock = FirstTokenClock()
    hf_generate(model, [prompt], new_tokens, streamer=clock)
    return (new_tokens - 1) / (time.perf_counter() - clock.t_first)


def hf_prefill_tok_s(model, prompt: list[int]) -> float:
    """One forward pass over the prompt; logits for the last position only, as generate()'s
    prefill (and nanovllm's) computes them."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        return len(prompt) / (time.perf_counter() - t0)


def hf_batched(model, prompts: list[list[int]], outputs: list[int]) -> dict:
    n_max = max(outputs)
    t0 = time.perf_counter()
    hf_generate(model, prompts, n_max)
    wall = time.perf_counter() - t0
    useful = sum(map(len, prompts)) + sum(outputs)
    return {
        "wall_s": wall,
        "useful_tok_s": useful / wall,
        "generated_tok_s": len(prompts) * n_max / wall,
    }


def hf_fixed(model, prompts: list[list[int]], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    hf_generate(model, prompts, new_tokens)
    wall = time.perf_counter() - t0
    n_out = len(prompts) * new_tokens
    return {
        "wall_s": wall,
        "generated_tok_s": n_out / wall,
        "total_tok_s": (sum(map(len, prompts)) + n_out) / wall,
    }


# ---- nanovllm workloads --------------------------------------------------------------------
def nv_batched(llm, prompts: list[list[int]], outputs: list[int]) -> dict:
    from nanovllm.bench import run_requests

    r = run_requests(llm, prompts, outputs)
    n_in, n_out = sum(map(len, prompts)), sum(outputs)
    wall = (n_in + n_out) / r["total_tok_s"]
    return {
        "wall_s": wall,
        "useful_tok_s": r["total_tok_s"],
        "generated_tok_s": n_out / wall,
        "prefill_tok_s": r["prefill_tok_s"],
        "decode_tok_s": r["decode_tok_s"],
        "ttft_median_s": r["ttft_median_s"],
    }


def nv_fixed(llm, prompts: list[list[int]], new_tokens: int) -> dict:
    from nanovllm.bench import run_requests

    r = run_requests(llm, prompts, [new_tokens] * len(prompts))
    n_in, n_out = sum(map(len, prompts)), len(prompts) * new_tokens
    wall = (n_in + n_out) / r["total_tok_s"]
    return {"wall_s": wall, "generated_tok_s": n_out / wall, "total_tok_s": r["total_tok_s"]}


# ---- the comparison ------------------------------------------------------------------------
ROWS = [  # key, label, higher is better
    ("decode_b1_tok_s", "batch-1 decode tok/s (after 1st token)", True),
    ("prefill_tok_s", "prefill tok/s ({prefill_len}-token prompt)", True),
    ("batched_useful_tok_s", "batched: useful tok/s ({n} reqs, in+out)", True),
    ("batched_generated_tok_s", "batched: generated tok/s (raw) [*]", True),
    ("batched_wall_s", "batched: wall time s", False),
    ("fixed_generated_tok_s", "fixed {fb}x{fn}: generated tok/s", True),
    ("fixed_total_tok_s", "fixed {fb}x{fn}: total tok/s (in+out)", True),
]
OWN_ROWS = [  # nanovllm's figures that have no transformers counterpart: key, label
    ("decode_roofline_tok_s", "decode roofline tok/s (step bytes / GEMV B/s)"),
    ("decode_of_roofline", "batch-1 decode / roofline"),
    ("decode_short_tok_s", "batch-1 decode tok/s, {short}-token context"),
    ("decode_long_tok_s", "batch-1 decode tok/s, {long}-token context"),
    ("long_over_short", "long / short context decode"),
    ("ttft_cold_s", "TTFT s, {prefix}-token prefix cold"),
    ("ttft_hot_s", "TTFT s, same prefix cached"),
    ("cold_over_hot", "TTFT cold / hot"),
]


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default=None,
        help="a Hugging Face safetensors directory or a .gguf file (default: "
        "nanovllm's default SmolLM2-135M-Instruct Q4_1 GGUF)",
    )
    p.add_argument(
        "--backends",
        default="numpy,torch",
        help="nanovllm backends, comma-separated, each loaded and run interleaved (numpy,torch)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each workload (median; 3)")
    p.add_argument("--decode-tokens", type=int, default=64, help="batch-1 new tokens (64)")
    p.add_argument("--decode-prompt-len", type=int, default=32, help="batch-1 prompt (32)")
    p.add_argument("--prefill-len", type=int, default=512, help="prefill prompt length (512)")
    p.add_argument("--num-requests", type=int, default=32, help="batched requests (32)")
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument(
        "--fixed-batch", type=int, default=32, help="fixed-batch workload: prompts (32; 0 skips it)"
    )
    p.add_argument("--fixed-new-tokens", type=int, default=64, help="fixed-batch new tokens (64)")
    p.add_argument(
        "--fixed-prompt-len",
        type=int,
        default=32,
        help="fixed-batch prompt length, the same for all (32)",
    )
    p.add_argument(
        "--long-context", type=int, default=4096,
        help="context of a long batch-1 decode, against a 128-token one (4096; 0 skips it)",
    )  # fmt: skip
    p.add_argument(
        "--shared-prefix", type=int, default=1024,
        help="prefix of the cold/hot time-to-first-token pair (1024; 0 skips it)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.decode_tokens < 2 or args.num_requests < 1:
        p.error("need --repeats >= 1, --decode-tokens >= 2, --num-requests >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from nanovllm.bench import (
        Workload,
        decode_step_bytes,
        decode_tok_s,
        gemv_bandwidth,
        linear_products,
        prefill_tok_s,
        run_requests,
        shared_prefix_ttft,
    )
    from nanovllm.llm import LLM

    env = environment(torch)
    nv_path, hf_dir, gguf_name = resolve_model(args.model)
    backends = args.backends.split(",")
    llms, nv_load = {}, {}
    for name in backends:
        log(f"loading nanovllm ({name}, float32) from {nv_path}")
        t0 = time.perf_counter()
        llms[name] = LLM(
            str(nv_path), backend=name, dtype="float32", enable_prefix_caching=False, verbose=False
        )
        nv_load[name] = time.perf_counter() - t0
    log(
        f"loading transformers (torch {torch.__version__}, float32) from {hf_dir}"
        + (f" gguf_file={gguf_name} (dequantizing, ~35 s)" if gguf_name else "")
    )
    model, hf_load = load_hf(hf_dir, gguf_name)
    first = llms[backends[0]]
    if model.config.vocab_size != first.model.vocab_size:
        raise SystemExit(
            f"vocab sizes differ: transformers {model.config.vocab_size}, "
            f"nanovllm {first.model.vocab_size}"
        )

    # every token id drawn up front from one seeded rng; all engines get the same ones
    work = Workload(args.seed, first.model.vocab_size)
    tokens = work.tokens
    prompts, outputs = work.requests(args.num_requests, args.input_len, args.output_len)
    decode_prompts = [tokens(args.decode_prompt_len) for _ in range(args.repeats)]
    prefill_prompts = [tokens(args.prefill_len) for _ in range(args.repeats)]
    fixed_prompts = [tokens(args.fixed_prompt_len) for _ in range(args.fixed_batch)]
    short_len = min(128, args.long_context // 2)
    context_prompts = [(tokens(short_len), tokens(args.long_context)) for _ in range(args.repeats)]
    prefix_prompts = [(tokens(args.shared_prefix), tokens(16)) for _ in range(args.repeats)]

    log("warm-up")
    for llm in llms.values():
        if llm.backend.jits:  # each new shape compiles once: one untimed round of each
            decode_tok_s(llm, decode_prompts[0], args.decode_tokens)
            prefill_tok_s(llm, prefill_prompts[0])
            run_requests(llm, prompts, outputs)
        else:
            run_requests(llm, prompts[:2], [4, 4])
    hf_generate(model, [p[:16] for p in prompts[:2]], 4)

    engines = [*backends, "transformers"]
    samples: dict[str, dict[str, list[float]]] = {e: {} for e in engines}
    # what the machine and the products alone give, measured in every repeat (the machine's
    # memory bandwidth drifts with its neighbours' load, as the workloads' figures do)
    step_bytes = {b: decode_step_bytes(llm, args.decode_prompt_len + args.decode_tokens // 2)
                  for b, llm in llms.items()}  # fmt: skip
    bounds = {"decode_b1_tok_s": (1, True), "prefill_tok_s": (args.prefill_len, False)}
    if args.fixed_batch:
        bounds["fixed_generated_tok_s"] = (args.fixed_batch, True)
    alone: dict = {"gemv": []}

    def record(engine: str, key: str, value: float) -> None:
        samples[engine].setdefault(key, []).append(value)

    for r in range(args.repeats):
        # rotate which engine goes first, so slow drift in the machine's load is shared
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for engine in order:
            llm = llms.get(engine)
            log(f"repeat {r + 1}/{args.repeats}: {engine}: batch-1 decode")
            record(
                engine,
                "decode_b1_tok_s",
                decode_tok_s(llm, decode_prompts[r], args.decode_tokens)
                if llm
                else hf_decode_tok_s(model, decode_prompts[r], args.decode_tokens),
            )
            log(f"repeat {r + 1}/{args.repeats}: {engine}: prefill {args.prefill_len}")
            record(
                engine,
                "prefill_tok_s",
                prefill_tok_s(llm, prefill_prompts[r])
                if llm
                else hf_prefill_tok_s(model, prefill_prompts[r]),
            )
        for engine in order:
            llm = llms.get(engine)
            log(f"repeat {r + 1}/{args.repeats}: {engine}: batched, {args.num_requests} requests")
            b = nv_batched(llm, prompts, outputs) if llm else hf_batched(model, prompts, outputs)
            for k, v in b.items():
                record(engine, f"batched_{k}", v)
            log(f"  {engine}: batched wall {b['wall_s']:.1f}s")
        if args.fixed_batch:
            for engine in order:
                llm = llms.get(engine)
                log(
                    f"repeat {r + 1}/{args.repeats}: {engine}: fixed batch "
                    f"{args.fixed_batch}x{args.fixed_new_tokens}"
                )
                f = (
                    nv_fixed(llm, fixed_prompts, args.fixed_new_tokens)
                    if llm
                    else hf_fixed(model, fixed_prompts, args.fixed_new_tokens)
                )
                for k, v in f.items():
                    record(engine, f"fixed_{k}", v)
        for engine in order:  # nanovllm's own rows
            llm = llms.get(engine)
            if llm is None:
                continue
            if args.long_context:
                log(f"repeat {r + 1}/{args.repeats}: {engine}: decode at {short_len} and "
                    f"{args.long_context} tokens of context")  # fmt: skip
                short, long = context_prompts[r]
                record(engine, "decode_short_tok_s", decode_tok_s(llm, short, args.decode_tokens))
                record(engine, "decode_long_tok_s", decode_tok_s(llm, long, args.decode_tokens))
            if args.shared_prefix:
                log(f"repeat {r + 1}/{args.repeats}: {engine}: shared prefix cold / hot")
                cold, hot = shared_prefix_ttft(llm, *prefix_prompts[r])
                record(engine, "ttft_cold_s", cold)
                record(engine, "ttft_hot_s", hot)
        log(
            f"repeat {r + 1}/{args.repeats}: GEMV bandwidth over "
            f"{max(step_bytes.values()) / 2**20:.0f} MiB (a decode step's reads), and the "
            "products of a batch-1 and a fixed-batch decode step and of a prefill, alone"
        )
        alone["gemv"].append(gemv_bandwidth(max(step_bytes.values())))
        for b, llm in llms.items():
            for key, (rows, head) in bounds.items():
                if (p := linear_products(llm, rows, head)) is not None:
                    alone.setdefault((b, key), []).append(p)

    med = {e: {k: statistics.median(v) for k, v in s.items()} for e, s in samples.items()}
    bandwidth = statistics.median(alone["gemv"])
    products = {  # of each bound, the repeat whose products took the median time
        b: {k: sorted(alone[b, k], key=lambda p: p["s"])[len(alone[b, k]) // 2] for k in bounds}
        for b in backends
        if all(alone.get((b, k)) for k in bounds)
    }
    # the decode's products over the model's own weights, as bytes per second
    own = {b: products[b]["decode_b1_tok_s"]["gb_s"] * 1e9 for b in products}
    for b in backends:
        m = med[b]
        m["decode_roofline_tok_s"] = bandwidth / step_bytes[b]
        m["decode_of_roofline"] = m["decode_b1_tok_s"] / m["decode_roofline_tok_s"]
        if args.long_context:
            m["long_over_short"] = m["decode_long_tok_s"] / m["decode_short_tok_s"]
        if args.shared_prefix:
            m["cold_over_hot"] = m["ttft_cold_s"] / m["ttft_hot_s"]
    ratio = {
        b: {
            k: med[b][k] / med["transformers"][k]
            for k, _, _ in ROWS
            if k in med[b] and k in med["transformers"] and k != "batched_generated_tok_s"
        }
        for b in backends
    }
    try:
        env["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    notes = [
        "Ratio = nanovllm / transformers, each backend against transformers on the same torch, "
        "all measured in this run on the same token ids; for wall time a ratio < 1 means "
        "nanovllm is faster.",
        "decode roofline: the bytes a batch-1 decode step reads (every weight once, the "
        "embedding one row, the KV of its context) over the bandwidth of a numpy float32 "
        "matrix-vector product over a matrix of that many bytes, measured in every repeat "
        "(median).",
        "products alone: the step's linear products timed on their own, one after another, "
        "on the model's own weights; no step of that many rows can run faster than they do, "
        "so their tok/s bounds the batch-1, prefill and fixed-batch figures (and their ratios).",
        "long / short context: batch-1 decode at a 128-token and at a --long-context prompt; "
        "TTFT cold / hot: a --shared-prefix prefix + 16 tokens with nothing cached, then "
        "another request with the same prefix (prefix caching on for these two only).",
        "batched: transformers' generate() cannot give each request its own output length, so "
        "it runs the requests as one left-padded batch (attention_mask) to max(outputs) new "
        f"tokens = {max(outputs)}; its 'useful tok/s' counts only sum(inputs) + sum(requested "
        f"outputs) = {sum(map(len, prompts))} + {sum(outputs)} tokens over its wall time. "
        "nanovllm runs the same requests with their own lengths (ignore_eos), continuous "
        "batching, and is counted the same way.",
        f"[*] raw generated tok/s: transformers = {args.num_requests} x {max(outputs)} "
        f"generated tokens (incl. those past each request's length) / wall time; nanovllm = "
        f"{sum(outputs)} tokens / wall time. Not like for like, so no ratio.",
        "batch-1 decode: tokens after the first over the time after the first (transformers: "
        "first-token time taken from a generate() streamer in the same call).",
        "prefill: transformers = one forward pass, logits for the last position only "
        "(logits_to_keep=1, as generate() and nanovllm do); nanovllm = generate(max_tokens=1).",
        (
            f"fixed batch: {args.fixed_batch} prompts of {args.fixed_prompt_len} tokens, "
            f"{args.fixed_new_tokens} new tokens each, no padding needed."
            if args.fixed_batch
            else "fixed batch: skipped (--fixed-batch 0)."
        ),
        "OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (and thread variables) may be set in the "
        "environment and change numpy's (OpenBLAS) speed; this script leaves them as found: "
        + ", ".join(
            f"{k}={env['env'][k] if env['env'][k] is not None else '(unset)'}" for k in ENV_VARS
        )
        + ".",
    ]
    result = {
        "model": str(nv_path),
        "repeats": args.repeats,
        "seed": args.seed,
        "workloads": {
            "decode": {"prompt_len": args.decode_prompt_len, "new_tokens": args.decode_tokens},
            "prefill_len": args.prefill_len,
            "batched": {
                "requests": args.num_requests,
                "input_len": list(args.input_len),
                "output_len": list(args.output_len),
                "sum_inputs": sum(map(len, prompts)),
                "sum_outputs": sum(outputs),
                "max_output": max(outputs),
            },
            "long_context": {"short": short_len, "long": args.long_context},
            "shared_prefix": args.shared_prefix,
            "fixed": {
                "batch": args.fixed_batch,
                "prompt_len": args.fixed_prompt_len,
                "new_tokens": args.fixed_new_tokens,
            },
        },
        "load_s": {**nv_load, "transformers": hf_load},
        "gemv_gb_s": bandwidth / 1e9,
        "gemv_samples_gb_s": [x / 1e9 for x in alone["gemv"]],
        "weights_gemv_gb_s": {b: v / 1e9 for b, v in own.items() if v},
        "linear_products": products,
        "decode_step_bytes": step_bytes,
        "environment": env,
        "median": med,
        "ratio": ratio,
        "samples": samples,
        "notes": notes,
    }
    if args.json:
        print(json.dumps(result))
        return
    print_table(args, result, len(prompts))


def print_table(args, result: dict, n_requests: int) -> None:
    env, med, ratio = result["environment"], result["median"], result["ratio"]
    blas = env["numpy_blas"]
    print(f"model: {result['model']}")
    print(
        f"python {env['python']}, numpy {env['numpy']}, torch {env['torch']}, "
        f"transformers {env['transformers']}; float32 on CPU"
    )
    print(
        f"cpus: {env['cpus']} (usable {env['cpus_usable']}); load average at start "
        f"{env['load_average_at_start']}, at end {env.get('load_average_at_end')}"
    )
    print(f"torch threads: {env['torch_threads']} (interop {env['torch_interop_threads']})")
    if blas["source"] == "threadpoolctl":
        for pool in blas["pools"]:
            print(f"numpy BLAS (threadpoolctl): {pool}")
    else:
        print(
            f"numpy BLAS ({blas['source']}): {blas.get('name')} {blas.get('version')}; "
            f"{blas.get('config') or blas.get('error')}"
        )
    print(
        "env: "
        + ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in env["env"].items())
    )
    loads = ", ".join(f"{e} {t:.1f}s" for e, t in result["load_s"].items())
    print(f"load time: {loads}; median of {result['repeats']} repeat(s)")
    print()
    backends = [e for e in med if e != "transformers"]
    w = 46
    head = "".join(f"{b:>11}" for b in backends) + f"{'transformers':>13}"
    head += "".join(f"{b + '/hf':>11}" for b in backends)
    print(f"{'figure':<{w}}{head}")
    print("-" * (w + len(head)))
    wl = result["workloads"]
    fmt = {
        "prefill_len": args.prefill_len,
        "n": n_requests,
        "fb": args.fixed_batch,
        "fn": args.fixed_new_tokens,
        "short": wl["long_context"]["short"],
        "long": wl["long_context"]["long"],
        "prefix": wl["shared_prefix"],
    }
    for key, label, _ in ROWS:
        if key not in med["transformers"]:
            continue
        line = "".join(f"{med[b][key]:>11.2f}" for b in backends)
        line += f"{med['transformers'][key]:>13.2f}"
        line += "".join(
            f"{(f'{ratio[b][key]:.2f}x' if key in ratio[b] else '-'):>11}" for b in backends
        )
        print(f"{label.format(**fmt):<{w}}{line}")
    print()
    print(f"{'nanovllm alone':<{w}}" + "".join(f"{b:>11}" for b in backends))
    for key, label in OWN_ROWS:
        if key in med[backends[0]]:
            line = "".join(f"{med[b][key]:>11.2f}" for b in backends)
            print(f"{label.format(**fmt):<{w}}{line}")
    for key, label in (
        ("batched_prefill_tok_s", "batched detail: prefill tok/s"),
        ("batched_decode_tok_s", "batched detail: decode tok/s"),
        ("batched_ttft_median_s", "batched detail: median TTFT s"),
    ):
        print(f"{label:<{w}}" + "".join(f"{med[b][key]:>11.2f}" for b in backends))
    print(f"GEMV bandwidth over a decode step's bytes: {result['gemv_gb_s']:.1f} GB/s")
    for b, v in result["weights_gemv_gb_s"].items():
        print(f"GEMV bandwidth over the model's own weights, one by one ({b}): {v:.1f} GB/s")
    what = {  # the products timed, and the transformers figure the bound is set against
        "decode_b1_tok_s": ("x every linear weight (a batch-1 decode step's)", "batch-1 decode"),
        "prefill_tok_s": ("x the layers' linear weights (a prefill's; its head reads one row)",
                          "prefill"),
        "fixed_generated_tok_s": ("x every linear weight (a fixed-batch decode step's)",
                                  "fixed-batch generated tok/s"),
    }  # fmt: skip
    hf = result["median"]["transformers"]
    for b, bounds in result["linear_products"].items():
        for key, p in bounds.items():
            print(
                f"products alone ({b}), {p['rows']} row{'s' * (p['rows'] != 1)} {what[key][0]}: "
                f"{p['s'] * 1e3:.1f} ms, {p['gflop_s']:.0f} GFLOP/s: at most {p['tok_s']:.0f} "
                f"tok/s, {p['tok_s'] / hf[key]:.2f}x transformers' {what[key][1]}"
            )
    print()
    print("notes:")
    for n in result["notes"]:
        print(f"- {n}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
