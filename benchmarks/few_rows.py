"""Products of a few rows with the default model's linear weights, each way a backend could
take them, interleaved round by round on the same weights (medians).

    python benchmarks/few_rows.py                 # numpy, rows 1-8, 7 rounds
    python benchmarks/few_rows.py --rows 2 4 7 --rounds 11
    python benchmarks/few_rows.py --backend torch --rows 1 4 32 512

A step of 2-7 rows (a speculative verification, the last sequences of a batch) multiplies
every weight by that many rows. Ways:
- numpy: numpy's own `x @ w` (OpenBLAS's matrix product) on the weight as the backend lays it
  out (a wide one copied into C order);
- as stored: numpy's own `x @ w` on the [in, out] transposed view of the [out, in] array in the
  file (what a wide weight was before the backend copied it);
- w^T @ x^T: the weight as the left operand, as a transposed view (what the backend does for
  8-32 rows);
- gemm blocks: numpy's product over column blocks of 256 KiB of the weight;
- backend: what `LinearWeight` does (2-7 rows: one matrix-vector product per row over column
  blocks of CHUNK_BYTES).

With --backend torch (on the CPU):
- torch: torch's own `x @ w` on the [in, out] view of the [out, in] weight (MKL);
- backend: the product with the weight oneDNN packed at load time (`PackedLinear`).
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


def as_stored(w) -> np.ndarray:
    """The [in, out] transposed view of the weight's [out, in] array in the file."""
    if w.mapped is not None:
        return w.mapped
    if w.flags.c_contiguous:
        raise SystemExit(
            "a wide weight was copied from memory, not from a mapped file, so its stored "
            "layout is gone: run with the converted-weights cache on (NANOVLLM_WEIGHTS_CACHE)"
        )
    return w.view(np.ndarray)


NUMPY_WAYS = {
    "numpy": lambda x, w: np.matmul(x, w.view(np.ndarray)),
    "as stored": lambda x, w: np.matmul(x, as_stored(w)),
    "w^T @ x^T": lambda x, w: np.matmul(w.view(np.ndarray).T, x.T).T,
    "gemm blocks": lambda x, w: gemm_blocks(x, w.view(np.ndarray)),
    "backend": lambda x, w: x @ w,
}


def torch_ways(weights: list) -> dict:
    """torch's own product against the packed one, on the same weights (unpacked once)."""
    from nanovllm.backend.torch_backend import PackedLinear

    if not all(isinstance(w, PackedLinear) for w in weights):
        raise SystemExit("the torch backend packs no weights here (not a CPU with oneDNN)")
    dense = {id(w): w.packed.to_dense().T for w in weights}  # [in, out] views, as loaded
    return {"torch": lambda x, w: x @ dense[id(w)], "backend": lambda x, w: x @ w}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=list(range(1, 9)))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    args = p.parse_args()
    llm = LLM(backend=args.backend, device="cpu", verbose=False)
    weights = products_weights(llm)
    ways = NUMPY_WAYS if args.backend == "numpy" else torch_ways(weights)
    mib = sum(w.shape[0] * w.shape[1] for w in weights) * llm.backend.itemsize / 2**20
    kernel = blas_kernel() if args.backend == "numpy" else f"torch {torch_threads()} threads"
    print(f"{len(weights)} weights, {mib:.0f} MiB; {kernel}; ms per step, median of rounds")
    print(f"{'rows':>4} " + " ".join(f"{k:>12}" for k in ways) + "   backend / best other")
    for rows in args.rows:
        for f in ways.values():  # untimed: first products set up (oneDNN builds its kernels)
            products_s(llm, weights, rows, repeats=1, product=f)
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.rounds):  # each way once a round, so a burst of load hits all
            for name, f in ways.items():
                times[name].append(1000 * products_s(llm, weights, rows, repeats=1, product=f))
        med = {k: statistics.median(v) for k, v in times.items()}
        best_other = min(v for k, v in med.items() if k != "backend")
        cells = " ".join(f"{med[k]:>12.1f}" for k in ways)
        print(f"{rows:>4} {cells}   {med['backend'] / best_other:.2f}x")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
