"""How often a seeded request's tokens change with its batch: the figures README.md quotes.

    python benchmarks/seed_reproducibility.py                      # default model, numpy
    python benchmarks/seed_reproducibility.py --batch-invariant    # the batch-invariant mode

24 random-token prompts, temperature 1, seeds 1000..1023, 32 tokens each (ignore_eos): the
batch, the same batch again (now with prefix-cache hits), and each request alone.
"""

from __future__ import annotations

import argparse

import numpy as np

from nanovllm import LLM, SamplingParams
from nanovllm.bench import blas_kernel


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--batch-invariant", action="store_true")
    args = p.parse_args()
    llm = LLM(args.model, backend=args.backend, verbose=False, batch_invariant=args.batch_invariant)
    print(f"{args.backend}, batch_invariant={args.batch_invariant}, blas: {blas_kernel()}")
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(100, min(30000, llm.model.vocab_size), size=int(rng.integers(8, 64))).tolist()
        for _ in range(args.requests)
    ]
    params = [
        SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=32, ignore_eos=True)
        for i in range(args.requests)
    ]

    def tokens(outs):
        return [o.outputs[0].token_ids for o in outs]

    batch = tokens(llm.generate(prompts, params, use_tqdm=False))
    again = tokens(llm.generate(prompts, params, use_tqdm=False))
    alone = [tokens(llm.generate([p], [sp], use_tqdm=False))[0] for p, sp in zip(prompts, params)]
    n = args.requests
    print(
        f"the batch again (prefix hits): {sum(a != b for a, b in zip(batch, again))} of {n} "
        "requests differ"
    )
    print(f"each request alone: {sum(a != b for a, b in zip(batch, alone))} of {n} differ")


if __name__ == "__main__":
    main()
