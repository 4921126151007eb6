"""Time to first token of a hybrid (Mamba2 + attention) model's prompt, cold against resumed
from the prefix cache: the same prompt again, and the next turn (the prompt, its answer and
a new question). There is no real Granite 4.0-H file here, so the model is a random one of
granite-4.0-h-350m's layer layout scaled down (saved by transformers, float32).

    python benchmarks/hybrid_prefix_cache.py [--prompt-len 1024] [--repeats 3]

Prints medians and the CPU kernel (threadpoolctl's architecture).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_info

from nanovllm import LLM, SamplingParams


def build(path: str) -> None:
    import torch
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    kinds = ["mamba"] * 12
    for i in (3, 7, 11):
        kinds[i] = "attention"
    config = GraniteMoeHybridConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=512, shared_intermediate_size=1024,
        num_hidden_layers=12, layer_types=kinds, num_attention_heads=6, num_key_value_heads=2,
        num_local_experts=0, position_embedding_type=None, mamba_n_heads=24, mamba_d_state=64,
        mamba_n_groups=1, mamba_expand=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    GraniteMoeHybridForCausalLM(config).float().save_pretrained(path)


def ttft(llm: LLM, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as path:
        build(path)
        llm = LLM(path, max_num_seqs=4, verbose=False)
        rows: dict[str, list[float]] = {"cold": [], "same prompt": [], "next turn": []}
        for _ in range(args.repeats):
            prompt = rng.integers(3, 8192, args.prompt_len).tolist()
            turn = prompt + rng.integers(3, 8192, 64).tolist()
            rows["cold"].append(ttft(llm, prompt))
            rows["same prompt"].append(ttft(llm, prompt))
            rows["next turn"].append(ttft(llm, turn))
    kernels = sorted({f"{i['internal_api']} {i.get('architecture')}" for i in threadpool_info()})
    cold = statistics.median(rows["cold"])
    print(f"hybrid prefix cache, {args.prompt_len}-token prompt, numpy, {', '.join(kernels)}")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"  {name:12s} TTFT {t:7.3f} s   {cold / t:5.1f}x faster than cold")


if __name__ == "__main__":
    main()
