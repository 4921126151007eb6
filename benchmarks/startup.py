"""Start-up time of the default model, warm (the file in the page cache), each run a fresh process.

    python benchmarks/startup.py [--repeats 5] [--model PATH] [--cold]

Prints the medians of: `LLM()` inside a fresh interpreter (import excluded), with the
converted-weights cache and without it (NANOVLLM_WEIGHTS_CACHE=off: dequantizing the GGUF
each time, as every start did before the cache), the whole CLI command
`python -m nanovllm --max-tokens 8 "The capital of France is"` (wall time), and the time
`gguf.GGUFReader` alone takes to parse the file's metadata (what loading spent most of its
time on before the bulk reader). `--cold` also times `LLM()`, import included, after
dropping the page cache (root only: it writes /proc/sys/vm/drop_caches): once with the
converted weights on disk, and once the first time (an empty cache: it dequantizes and
writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

LLM_TIME = """
import time
from nanovllm import LLM
t = time.perf_counter()
LLM({model!r}, verbose=False)
print(time.perf_counter() - t)
"""
GGUF_READER_TIME = """
import time, gguf
from nanovllm.weights.default_model import resolve_model
path = str(resolve_model({model!r}))
t = time.perf_counter()
gguf.GGUFReader(path)
print(time.perf_counter() - t)
"""


def in_fresh_process(code: str, weights_cache: str | None = None) -> float:
    """Seconds `code` prints, run in a new interpreter (with NANOVLLM_WEIGHTS_CACHE set)."""
    env = dict(os.environ)
    if weights_cache is not None:
        env["NANOVLLM_WEIGHTS_CACHE"] = weights_cache
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout.split()[-1])


def cli_wall_seconds(model: str | None) -> float:
    cmd = [sys.executable, "-m", "nanovllm", "--max-tokens", "8", "The capital of France is"]
    if model:
        cmd[3:3] = ["--model", model]
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True)
    return time.perf_counter() - t


COLD_TIME = """
import time
t = time.perf_counter()
from nanovllm import LLM
LLM({model!r}, verbose=False)
print(time.perf_counter() - t)
"""


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None, help="a .gguf path (default: the default model)")
    p.add_argument("--cold", action="store_true", help="also time a cold start (needs root)")
    args = p.parse_args()
    from nanovllm.bench import blas_kernel

    in_fresh_process(LLM_TIME.format(model=args.model))  # warms the page cache
    runs: dict[str, list[float]] = {
        "llm_init_s": [],
        "llm_init_without_weights_cache_s": [],
        "cli_wall_s": [],
        "gguf_reader_parse_s": [],
    }
    if args.cold:
        runs["cold_import_and_llm_init_s"] = []
        runs["first_time_import_and_llm_init_s"] = []
    for _ in range(args.repeats):
        runs["llm_init_s"].append(in_fresh_process(LLM_TIME.format(model=args.model)))
        runs["llm_init_without_weights_cache_s"].append(
            in_fresh_process(LLM_TIME.format(model=args.model), weights_cache="off")
        )
        runs["cli_wall_s"].append(cli_wall_seconds(args.model))
        runs["gguf_reader_parse_s"].append(
            in_fresh_process(GGUF_READER_TIME.format(model=args.model))
        )
        if args.cold:
            drop_page_cache()
            cold = in_fresh_process(COLD_TIME.format(model=args.model))
            runs["cold_import_and_llm_init_s"].append(cold)
            with tempfile.TemporaryDirectory() as empty:  # no converted weights yet
                drop_page_cache()
                first = in_fresh_process(COLD_TIME.format(model=args.model), weights_cache=empty)
            runs["first_time_import_and_llm_init_s"].append(first)
    figures = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    figures |= {"repeats": args.repeats, "blas_kernel": blas_kernel()}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
