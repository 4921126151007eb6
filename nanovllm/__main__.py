"""python -m nanovllm [options] PROMPT...   |   python -m nanovllm bench [options]"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanovllm",
        description="Generate text with a local LLM. With one prompt the answer streams as it "
                    "is generated; several prompts run as one batch. `python -m nanovllm bench "
                    "--help` shows the benchmark.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="prompt text; '-' reads prompts from stdin, one per line")
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 is greedy, the default here for reproducible answers")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top "
                   "probability (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop at this text (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    return p


def add_model_args(p: argparse.ArgumentParser, backend_help: str = "") -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face model directory, a .gguf file, or a hub id (default: "
                        "SmolLM2-135M-Instruct Q4_1, fetched once into ~/.cache/nanovllm)")
    p.add_argument("--backend", default="numpy",
                   help="array library: numpy (default), array_api_strict, jax, torch, cupy"
                   + backend_help)
    p.add_argument("--device", default=None, help="device as the backend spells it (cpu, gpu, "
                   "cuda:0); default: the backend's default")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output in tokens (default: the model's, as the KV "
                        "cache allows)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences per step (32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens per step; longer prompts are prefilled in chunks (512)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (16)")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks (default: from --kv-cache-memory)")
    p.add_argument("--kv-cache-memory", type=int, default=None,
                   help="KV-cache budget in bytes (default 1 GiB)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")


def make_llm(args: argparse.Namespace):
    from .llm import LLM

    return LLM(args.model, backend=args.backend, device=args.device, dtype=args.dtype,
               max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
               num_kv_blocks=args.num_kv_blocks, kv_cache_memory=args.kv_cache_memory,
               enable_prefix_caching=not args.no_prefix_caching)


def generate(args: argparse.Namespace) -> None:
    from .sampling_params import SamplingParams

    prompts: list = []
    for p in args.prompts:
        if p == "-":
            prompts.extend(line for line in sys.stdin.read().splitlines() if line.strip())
        else:
            prompts.append(p)
    if not prompts:
        raise ValueError("no prompt given: pass PROMPT text, or '-' with prompts on stdin")
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed, max_tokens=args.max_tokens,
                            stop=args.stop)
    llm = make_llm(args)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [llm.chat_prompt(system + [{"role": "user", "content": p}]) for p in prompts]
    if len(prompts) == 1:
        if not args.chat:
            print(prompts[0], end="", flush=True)
        for delta in llm.stream(prompts[0], params):
            print(delta, end="", flush=True)
        print()
        return
    for i, out in enumerate(llm.generate(prompts, params)):
        shown = "" if args.chat else out.prompt
        print(f"--- [{i}]\n{shown}{out.outputs[0].text}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "bench":
            from .bench import main as bench_main
            bench_main(argv[1:])
        else:
            generate(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        if isinstance(exc, (TypeError, RuntimeError)) and not _is_user_error(exc):
            raise
        print(f"nanovllm: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(exc: BaseException) -> bool:
    from .weights.default_model import DefaultModelError

    return isinstance(exc, DefaultModelError)


if __name__ == "__main__":
    sys.exit(main())
