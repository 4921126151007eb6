"""Products of a few rows with the default model's linear weights, each way the numpy backend
could take them, interleaved round by round on the same weights (medians).

    python benchmarks/few_rows.py                 # rows 1-8, 7 rounds
    python benchmarks/few_rows.py --rows 2 4 7 --rounds 11

A step of 2-7 rows (a speculative verification, the last sequences of a batch) multiplies
every weight by that many rows. Ways:
- numpy: numpy's own `x @ w` (OpenBLAS's matrix product);
- w^T @ x^T: the weight as the left operand, as a transposed view (what the backend does for
  8-32 rows);
- gemm blocks: numpy's product over column blocks of 256 KiB of the weight;
- backend: what `LinearWeight` does (2-7 rows: one matrix-vector product per row over column
  blocks of CHUNK_BYTES).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from nanovllm import LLM
from nanovllm.bench import blas_kernel, products_s, products_weights


def gemm_blocks(x: np.ndarray, w: np.ndarray, block_bytes: int = 256 << 10) -> np.ndarray:
    out = np.empty((x.shape[0], w.shape[1]), dtype=np.float32)
    cols = max(16, block_bytes // (w.shape[0] * w.itemsize))
    for c in range(0, w.shape[1], cols):
        np.matmul(x, w[:, c : c + cols], out=out[:, c : c + cols])
    return out


WAYS = {
    "numpy": lambda x, w: np.matmul(x, w.view(np.ndarray)),
    "w^T @ x^T": lambda x, w: np.matmul(w.view(np.ndarray).T, x.T).T,
    "gemm blocks": lambda x, w: gemm_blocks(x, w.view(np.ndarray)),
    "backend": lambda x, w: x @ w,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    llm = LLM(backend="numpy", verbose=False)
    weights = products_weights(llm)
    mib = sum(w.nbytes for w in weights) / 2**20
    print(f"{len(weights)} weights, {mib:.0f} MiB; {blas_kernel()}; ms per step, median of rounds")
    print(f"{'rows':>4} " + " ".join(f"{k:>12}" for k in WAYS) + "   backend / best other")
    for rows in args.rows:
        times: dict[str, list[float]] = {k: [] for k in WAYS}
        for _ in range(args.rounds):  # each way once a round, so a burst of load hits all
            for name, f in WAYS.items():
                times[name].append(1000 * products_s(llm, weights, rows, repeats=1, product=f))
        med = {k: statistics.median(v) for k, v in times.items()}
        best_other = min(v for k, v in med.items() if k != "backend")
        cells = " ".join(f"{med[k]:>12.1f}" for k in WAYS)
        print(f"{rows:>4} {cells}   {med['backend'] / best_other:.2f}x")


if __name__ == "__main__":
    main()
