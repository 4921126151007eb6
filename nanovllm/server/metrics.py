"""Prometheus metrics with vLLM's names under the `nanovllm:` prefix.

Only the engine loop writes them (from its own counters, after each step); `/metrics` reads
them. Every sample carries `model_name` and `engine` ("0": one engine; replicas later).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
FINISH_REASONS = ("stop", "length", "abort", "error")


class Metrics:
    def __init__(self, model_name: str, engine: str = "0"):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": engine}
        names = list(labels)

        def make(kind, name: str, doc: str, **kw):
            metric = kind(f"nanovllm:{name}", doc, names, registry=self.registry, **kw)
            return metric.labels(**labels)

        self.running = make(Gauge, "num_requests_running", "Sequences in the running batch.")
        self.waiting = make(
            Gauge, "num_requests_waiting", "Sequences waiting to be scheduled (new or preempted)."
        )
        self.kv_usage = make(
            Gauge,
            "kv_cache_usage_perc",
            "KV-cache blocks held by requests / all blocks (1 = full).",
        )
        self.prompt_tokens = make(Counter, "prompt_tokens_total", "Prefilled prompt tokens.")
        self.generation_tokens = make(Counter, "generation_tokens_total", "Generated tokens.")
        self.preemptions = make(Counter, "num_preemptions_total", "Preempted sequences.")
        self.prefix_queries = make(
            Counter,
            "prefix_cache_queries_total",
            "Full prompt blocks looked up in the prefix cache.",
        )
        self.prefix_hits = make(
            Counter, "prefix_cache_hits_total", "Full prompt blocks found in the prefix cache."
        )
        self.spec_drafts = make(
            Counter,
            "spec_decode_num_draft_tokens_total",
            "Tokens proposed by speculative decoding (n-gram lookup).",
        )
        self.spec_accepted = make(
            Counter,
            "spec_decode_num_accepted_tokens_total",
            "Proposed tokens that the model accepted.",
        )
        success = Counter(
            "nanovllm:request_success_total",
            "Finished requests by reason.",
            [*names, "finished_reason"],
            registry=self.registry,
        )
        self.success = {r: success.labels(**labels, finished_reason=r) for r in FINISH_REASONS}
        self.ttft = make(
            Histogram,
            "time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=LATENCY_BUCKETS,
        )
        self.itl = make(
            Histogram,
            "inter_token_latency_seconds",
            "Time between two tokens of one sequence.",
            buckets=LATENCY_BUCKETS,
        )
        self.e2e = make(
            Histogram, "e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS
        )
        self.queue_time = make(
            Histogram,
            "request_queue_time_seconds",
            "Arrival to first scheduled step.",
            buckets=LATENCY_BUCKETS,
        )
        self._seen = {
            "preemptions": 0,
            "prefix_queries": 0,
            "prefix_hits": 0,
            "spec_drafts": 0,
            "spec_accepted": 0,
        }

    # ---- written by the engine loop ----------------------------------------------------
    def scheduled(self, queue_seconds: float, prompt_tokens: int) -> None:
        self.queue_time.observe(queue_seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def finished(self, reason: str, e2e_seconds: float | None) -> None:
        self.success[reason].inc()
        if e2e_seconds is not None:
            self.e2e.observe(e2e_seconds)

    def publish(self, *, running: int, waiting: int, kv_usage: float, **totals: int) -> None:
        """Gauges as they are now; counters from the engine's running totals."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        for name, total in totals.items():
            getattr(self, name).inc(total - self._seen[name])
            self._seen[name] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
