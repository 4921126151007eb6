"""python -m nanovllm serve: an OpenAI-compatible HTTP server over one LLM, or over N engine
replicas on Ray (--data-parallel-size N; server/replicas.py).

The port opens at once and /health answers 503 until the model is loaded (in a thread).
SIGTERM or Ctrl-C stop accepting, abort what runs (each request gets an error), and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from ..cli import add_model_args, make_llm
from ..weights.default_model import DEFAULT_GGUF_NAME, DEFAULT_NAME

# the request fields a model's generation_config.json may give defaults for (as vLLM reads it)
GENERATION_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# The default model's GGUF carries no generation config. Its first answer token is close to a
# coin flip ("The" -1.88, "L" -1.97 for the README's question), so that even at temperature 0.2
# it names Paris about half the time: it answers greedily unless a request says otherwise,
# as the CLI does.
DEFAULT_MODEL_GENERATION = {"temperature": 0.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nanovllm serve",
        description="Serve a model over OpenAI's HTTP API (/v1/completions, "
        "/v1/chat/completions, /v1/models, /tokenize, /detokenize, /health, "
        "/version, /metrics).",
    )
    add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("NANOVLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health, "
        "/version and /metrics (default: $NANOVLLM_API_KEY, else no key)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients pass and /v1/models lists (default: the model "
        "file or directory name)",
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="answer 503 with Retry-After while this many requests wait to be "
        "scheduled (default: no limit)",
    )
    p.add_argument(
        "--override-generation-config",
        default=None,
        metavar="JSON",
        help="defaults for the sampling fields a request leaves out, over the "
        "model's generation_config.json, e.g. '{\"temperature\": 0.7}'; keys: "
        + ", ".join(GENERATION_FIELDS),
    )
    p.add_argument(
        "--data-parallel-size",
        type=int,
        default=1,
        help="engine replicas, each a whole engine in a Ray actor, on any node of the Ray "
        "cluster; requests go to the least loaded (1: one engine in this process)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster the replicas run on, e.g. 10.0.0.1:6379 or auto (default: a "
        "local Ray instance started for this server); implies Ray even with one replica",
    )
    p.add_argument(
        "--num-cpus-per-replica",
        type=float,
        default=1.0,
        help="CPUs Ray reserves for each replica, and the threads its numpy BLAS uses (1)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn's log level (info)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    return p


def served_name(model: str | None) -> str:
    return Path(model).name if model else DEFAULT_GGUF_NAME


def sampling_defaults(model: str | None, override: str | None) -> dict[str, float]:
    """Request defaults: the model's generation config (a directory's generation_config.json;
    the recommended one for the default model), then --override-generation-config."""
    defaults: dict = {}
    if model in (None, DEFAULT_NAME) or Path(model).name == DEFAULT_GGUF_NAME:
        defaults.update(DEFAULT_MODEL_GENERATION)
    elif (Path(model) / "generation_config.json").is_file():
        config = json.loads((Path(model) / "generation_config.json").read_text())
        defaults.update({k: config[k] for k in GENERATION_FIELDS if k in config})
    if override is not None:
        try:
            extra = json.loads(override)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"--override-generation-config {override!r} is not JSON ({e}); "
                """pass an object such as '{"temperature": 0.7}'"""
            ) from None
        unknown = (
            sorted(set(extra) - set(GENERATION_FIELDS))
            if isinstance(extra, dict)
            else ["(not an object)"]
        )
        if unknown:
            raise ValueError(
                f"--override-generation-config has {unknown}; pass an object "
                f"with keys among {', '.join(GENERATION_FIELDS)}"
            )
        defaults.update(extra)
    from ..sampling_params import SamplingParams

    SamplingParams(**defaults)  # out-of-range values fail here, naming the field
    return defaults


def main(argv: list[str]) -> int:
    import uvicorn

    from .app import ServerState, build_app
    from .metrics import Metrics

    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port; pass 0..65535")
    if args.max_waiting_requests is not None and args.max_waiting_requests < 0:
        raise ValueError(
            f"--max-waiting-requests {args.max_waiting_requests} is negative; "
            "pass 0 or more, or leave it out for no limit"
        )
    from ..config import SpeculativeConfig

    SpeculativeConfig.parse(args.speculative_config)  # a bad one fails before the port opens
    if args.data_parallel_size < 1:
        raise ValueError(
            f"--data-parallel-size {args.data_parallel_size} must be 1 or more (the number "
            "of engine replicas)"
        )
    if args.num_cpus_per_replica <= 0:
        raise ValueError(f"--num-cpus-per-replica {args.num_cpus_per_replica} must be above 0")
    on_ray = args.data_parallel_size > 1 or args.ray_address is not None
    if on_ray:
        from .replicas import connect_ray

        # on this (main) thread: the processes of a local Ray instance end with the thread
        # that started them
        connect_ray(args.ray_address)
    name = args.served_model_name or served_name(args.model)
    defaults = sampling_defaults(args.model, args.override_generation_config)
    state = ServerState(name, Metrics(name), args.api_key or None, defaults)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if state.loop is not None:
                state.loop.stop(wait=None)  # streams end now, so connections close at once
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            build_app(state),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=not args.no_access_log,
            timeout_graceful_shutdown=5,
        )
    )
    failure: list[BaseException] = []

    def load() -> None:
        try:
            if on_ray:
                from .replicas import start_replicas

                replicas = start_replicas(
                    vars(args),
                    name,
                    args.data_parallel_size,
                    args.num_cpus_per_replica,
                    args.max_waiting_requests,
                )
                state.attach_replicas(replicas)
            else:
                state.attach(make_llm(args), args.max_waiting_requests)
        except BaseException as e:  # reported by main once the server is down
            failure.append(e)
            server.should_exit = True
            return
        where = f" on {args.data_parallel_size} Ray replica(s)" if on_ray else ""
        print(
            f"nanovllm: serving {name!r}{where} at http://{args.host}:{args.port}/v1; sampling "
            f"defaults {defaults or 'of SamplingParams'}",
            file=sys.stderr,
            flush=True,
        )

    threading.Thread(target=load, name="nanovllm-load", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it is down: make that a no-op for
    # SIGTERM and catch SIGINT's KeyboardInterrupt, so that a requested stop exits 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state.loop is not None:
            state.loop.stop()
        if on_ray:
            import ray

            ray.shutdown()  # ends the replicas (and the local Ray instance, if it started one)
    if failure:
        raise failure[0]
    return 0
