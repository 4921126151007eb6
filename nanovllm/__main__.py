"""python -m nanovllm [options] PROMPT...  |  ... serve [options]  |  ... bench [serve] [options]"""

from __future__ import annotations

import argparse
import sys

from .cli import add_model_args, make_llm


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanovllm",
        description="Generate text with a local LLM. With one prompt the answer streams as it "
        "is generated; several prompts run as one batch. `python -m nanovllm serve "
        "--help` shows the OpenAI-compatible server, `python -m nanovllm bench "
        "--help` the benchmark (`bench serve --help`: the serving benchmark).",
    )
    p.add_argument(
        "prompts",
        nargs="+",
        metavar="PROMPT",
        help="prompt text; '-' reads prompts from stdin, one per line",
    )
    add_model_args(p)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (64)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 is greedy, the default here for reproducible answers",
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0 = off)")
    p.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens below min_p x the top probability (0 = off)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop at this text (repeatable)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the model's chat template",
    )
    p.add_argument("--system", default=None, help="system message for --chat")
    return p


def generate(args: argparse.Namespace) -> None:
    from .sampling_params import SamplingParams

    prompts: list = []
    for p in args.prompts:
        if p == "-":  # bytes that are not UTF-8 become U+FFFD, as in arguments
            text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
            prompts.extend(line for line in text.splitlines() if line.strip())
        else:
            prompts.append(p.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    if not prompts:
        raise ValueError("no prompt given: pass PROMPT text, or '-' with prompts on stdin")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
    )
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
        if argv[:2] == ["bench", "serve"]:
            from .server.bench_serve import main as bench_serve_main

            return bench_serve_main(argv[2:])
        if argv and argv[0] == "bench":
            from .bench import main as bench_main

            bench_main(argv[1:])
        elif argv and argv[0] == "serve":
            from .server.serve import main as serve_main

            return serve_main(argv[1:])
        else:
            generate(build_parser().parse_args(argv))
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as exc:
        if isinstance(exc, (TypeError, RuntimeError, ImportError)) and not _is_user_error(exc):
            raise
        print(f"nanovllm: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _is_user_error(exc: BaseException) -> bool:
    from .errors import ClusterError, DefaultModelError

    if isinstance(exc, ImportError):  # an optional dependency, named with its extra
        return "pip install 'nanovllm[" in str(exc)
    return isinstance(exc, DefaultModelError | ClusterError)


if __name__ == "__main__":
    sys.exit(main())
