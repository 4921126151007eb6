"""python -m nanovllm bench serve: the server against offline LLM.generate, same workload.

It loads the model in this process (offline) and starts `python -m nanovllm serve` with the
same options, then runs each repeat on both in turn: the offline engine through
`engine.step()`, the server through its HTTP API (streamed /v1/completions, token-id prompts
with random lengths, ignore_eos) at a fixed concurrency or a Poisson request rate, as vLLM's
benchmark_serving.py does. It prints throughput, time to first token and inter-token latency
(medians over repeats; TTFT/ITL median and p99 over requests), and the server / offline ratios.
Note that the HTTP client runs on the same machine and takes CPU from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

from ..bench import Workload, blas_kernel, run_requests
from ..cli import add_model_args, make_llm, model_argv


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanovllm bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default: all at once, within --concurrency)",
    )
    p.add_argument("--input-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument("--repeats", type=int, default=3, help="runs of each (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="the server's engine replicas on a local Ray instance (1: one engine, no Ray); "
        "the offline peer is always one engine",
    )
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    return p.parse_args(argv)


def start_server(args: argparse.Namespace, log) -> tuple[subprocess.Popen, str]:
    from ..weights.default_model import default_model_path

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = args.model or str(default_model_path())
    command = [
        sys.executable,
        "-m",
        "nanovllm",
        "serve",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        *model_argv(args, model=model),
    ]
    if args.data_parallel_size > 1:
        command += ["--data-parallel-size", str(args.data_parallel_size)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become healthy; its log: {log.name}")


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], n: int) -> dict:
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    body = {
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                times.append(time.perf_counter())
    return {"start": start, "end": time.perf_counter(), "times": times, "tokens": tokens}


async def run_server(
    url: str, prompts, outputs, concurrency: int, rate: float, rng: np.random.Generator
) -> dict:
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(600)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def limited(prompt, n):
            async with limit:
                return await one_request(client, url, prompt, n)

        tasks = []
        start = time.perf_counter()
        for prompt, n in zip(prompts, outputs):
            tasks.append(asyncio.create_task(limited(prompt, n)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
        total = time.perf_counter() - start
    assert [r["tokens"] for r in results] == list(outputs), "the server lost tokens"
    ttft = [r["times"][0] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    n_in, n_out = sum(map(len, prompts)), sum(outputs)
    return {
        "total_tok_s": (n_in + n_out) / total,
        "output_tok_s": n_out / total,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "itl_median_s": statistics.median(itl),
        "itl_p99_s": float(np.percentile(itl, 99)),
    }


def run_offline(llm, prompts, outputs) -> dict:
    start = time.perf_counter()
    figures = run_requests(llm, prompts, outputs)
    total = time.perf_counter() - start
    return {"total_tok_s": figures["total_tok_s"], "output_tok_s": sum(outputs) / total}


def main(argv: list[str]) -> int:
    args = parse(argv)
    args.no_prefix_caching = True  # every run must compute its prompts
    llm = make_llm(args)
    work = Workload(args.seed, llm.model.vocab_size)
    prompts, outputs = work.requests(args.num_requests, args.input_len, args.output_len)
    rng = np.random.default_rng(args.seed)
    log = tempfile.NamedTemporaryFile("wb", prefix="nanovllm-serve-", suffix=".log", delete=False)
    proc, url = start_server(args, log)
    try:
        run_requests(llm, prompts[:2], [4, 4])  # warm both up
        asyncio.run(run_server(url, prompts[:2], [4, 4], 2, float("inf"), rng))
        offline, served = [], []
        for _ in range(args.repeats):
            offline.append(run_offline(llm, prompts, outputs))
            served.append(
                asyncio.run(
                    run_server(url, prompts, outputs, args.concurrency, args.request_rate, rng)
                )
            )
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        os.unlink(log.name)
    med = statistics.median
    table = {
        "requests": args.num_requests,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
        "blas": blas_kernel(),
        **{f"offline_{k}": med(r[k] for r in offline) for k in offline[0]},
        **{f"server_{k}": med(r[k] for r in served) for k in served[0]},
    }
    for k in ("total_tok_s", "output_tok_s"):
        table[f"ratio_{k}"] = table[f"server_{k}"] / table[f"offline_{k}"]
    if args.json:
        print(json.dumps(table))
        return 0
    print(
        f"{args.num_requests} requests, input {args.input_len[0]}-{args.input_len[1]}, "
        f"output {args.output_len[0]}-{args.output_len[1]} tokens, concurrency "
        f"{args.concurrency}, rate {args.request_rate}/s; BLAS: {table['blas']}; "
        f"medians of {args.repeats}; server: {args.data_parallel_size} engine replica(s)"
    )
    print(f"{'figure':>16} {'offline':>10} {'server':>10} {'server/offline':>15}")
    for k in ("total_tok_s", "output_tok_s"):
        off, srv = table[f"offline_{k}"], table[f"server_{k}"]
        print(f"{k:>16} {off:>10.1f} {srv:>10.1f} {srv / off:>14.2f}x")
    # TTFT is the server's only: offline, every request arrives at once and queues for a
    # free sequence slot, while the client holds at most --concurrency in flight
    for k in ("ttft_median_s", "ttft_p99_s", "itl_median_s", "itl_p99_s"):
        print(f"{k:>16} {'':>10} {table[f'server_{k}']:>10.4f}")
    return 0
