"""EngineLoop: the one thread that owns the LLMEngine while a server runs.

HTTP handlers never touch the engine. They `submit` a request (token ids + SamplingParams)
with an asyncio queue of their own and `abort` it; both go through a locked inbox that the
loop drains before every step. After each step the loop pushes, per request, an `Update`
with what is new (token ids, logprobs) and the text so far, onto that request's queue in the
event loop's thread. The event loop never waits on a model step.

A request's queue first gets an `Update` with no choices once the engine accepted it, or one
with `error` set if it did not; then updates until one has `finished` set.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count

from ..engine.llm_engine import LLMEngine
from ..errors import StepError
from ..outputs import Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .metrics import Metrics

MAX_CONSECUTIVE_STEP_FAILURES = 3  # then the engine is taken to be broken: /health says 503


class ServerError(Exception):
    """An error a request gets from the loop, with the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 500, kind: str = "internal_server_error"):
        super().__init__(message)
        self.status, self.kind = status, kind

    def __reduce__(self):  # sent from a replica's process whole (status and kind too)
        return ServerError, (str(self), self.status, self.kind)


@dataclass(frozen=True, slots=True)
class ChoiceUpdate:
    index: int
    text: str  # the whole text so far (a stop string may still cut its end)
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[dict[int, Logprob], ...] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True, slots=True)
class Update:
    request_id: str
    choices: tuple[ChoiceUpdate, ...] = ()
    finished: bool = False
    prompt_logprobs: list | None = None  # on the finishing update, when asked for
    error: Exception | None = None


@dataclass(slots=True)
class _Tracked:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    sent: list[int]  # per choice: token ids already pushed
    done: list[bool]  # per choice: finish reason pushed
    scheduled: bool = False
    first_token: float | None = None
    last_token: list[float] = field(default_factory=list)


class EngineLoop:
    def __init__(self, engine: LLMEngine, metrics: Metrics, max_waiting: int | None = None):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self._cond = threading.Condition()
        self._inbox: deque[tuple] = deque()  # ("add", rid, ids, params, tracked) / ("abort", rid)
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._ids = count()
        self._stopping = False
        self._waiting = 0  # requests submitted and not yet scheduled (published by the loop)
        self.dead: str | None = None  # why the engine cannot go on, once it cannot
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> str:
        """Queue a request; its updates arrive on `queue`. Raises ServerError (503) when the
        server is stopping, broken, or past max_waiting."""
        with self._cond:
            if self._stopping or self.dead:
                raise ServerError(
                    self.dead or "the server is shutting down", 503, "service_unavailable"
                )
            if self.max_waiting is not None and self._waiting >= self.max_waiting:
                raise ServerError(
                    f"{self._waiting} requests are waiting, the limit set by "
                    f"--max-waiting-requests={self.max_waiting}; retry later",
                    503,
                    "service_unavailable",
                )
            rid = f"req-{next(self._ids)}"
            tracked = _Tracked(
                asyncio.get_running_loop(),
                queue,
                time.monotonic(),
                len(prompt_ids),
                [0] * params.n,
                [False] * params.n,
                last_token=[0.0] * params.n,
            )
            self._inbox.append(("add", rid, prompt_ids, params, tracked))
            self._waiting += 1
            self._cond.notify()
        return rid

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def stop(self, wait: float | None = 10.0) -> None:
        """Abort every request (each gets a 503 error) and end the thread; wait for it up to
        `wait` seconds (None: do not wait, as in a signal handler)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if wait is not None and self._thread.is_alive():
            self._thread.join(wait)

    @property
    def healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        failures = 0
        while True:
            with self._cond:
                while (
                    not self._inbox
                    and not self._stopping
                    and not (engine.has_unfinished_requests() and not self.dead)
                ):
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            posts: list[tuple[_Tracked, Update]] = []
            for command in commands:
                self._apply(command, posts)
            if stopping:
                self._fail_all(
                    ServerError(
                        "the server is shutting down; the request was aborted",
                        503,
                        "service_unavailable",
                    ),
                    posts,
                )
                self._post(posts)
                self._publish()
                return
            if engine.has_unfinished_requests() and not self.dead:
                step_start = time.monotonic()
                try:
                    outputs = engine.step()
                    failures = 0
                except StepError as e:
                    failures += 1
                    error = ServerError(str(e))
                    for rid in e.request_ids:
                        tracked = self._tracked.pop(rid, None)
                        if tracked is not None:
                            self._unwait(tracked)
                            posts.append((tracked, Update(rid, finished=True, error=error)))
                    if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                        self._die(f"the engine failed {failures} steps in a row; last: {e}", posts)
                    outputs = []
                except Exception as e:  # outside the model step: the engine state is unknown
                    self._die(f"the engine failed ({type(e).__name__}: {e})", posts)
                    outputs = []
                for out in outputs:
                    self._collect(out, step_start, posts)
            self._post(posts)
            self._publish()

    def _apply(self, command: tuple, posts: list) -> None:
        if command[0] == "abort":
            tracked = self._tracked.pop(command[1], None)
            if tracked is not None:
                self._unwait(tracked)
                if self.engine.abort_request(command[1]) is not None:
                    self.metrics.finished("abort", None)
            return
        _, rid, ids, params, tracked = command
        try:
            self.engine.add_request(ids, params, request_id=rid)
        except Exception as e:  # a request the handler's checks let through
            self._unwait(tracked)
            posts.append(
                (
                    tracked,
                    Update(
                        rid, finished=True, error=ServerError(str(e), 400, "invalid_request_error")
                    ),
                )
            )
            return
        self._tracked[rid] = tracked
        posts.append((tracked, Update(rid)))

    def _unwait(self, tracked: _Tracked) -> None:
        if not tracked.scheduled:
            tracked.scheduled = True
            with self._cond:
                self._waiting -= 1

    def _collect(self, out: RequestOutput, step_start: float, posts: list) -> None:
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            return
        now = time.monotonic()
        if not tracked.scheduled:
            self._unwait(tracked)
            self.metrics.scheduled(step_start - tracked.arrival, tracked.num_prompt_tokens)
        failed = next((c for c in out.outputs if c.finish_reason == "error"), None)
        if failed is not None:  # e.g. non-finite logits: the request fails, the engine goes on
            del self._tracked[out.request_id]
            self.engine.abort_request(out.request_id)
            self.metrics.finished("error", now - tracked.arrival)
            posts.append(
                (
                    tracked,
                    Update(
                        out.request_id,
                        finished=True,
                        error=ServerError(failed.error or "the request failed"),
                    ),
                )
            )
            return
        choices = []
        for c in out.outputs:
            i = c.index
            new = c.token_ids[tracked.sent[i] :]
            if not new and (tracked.done[i] or c.finish_reason is None):
                continue
            if new:
                if tracked.first_token is None:
                    tracked.first_token = now
                    self.metrics.first_token(now - tracked.arrival)
                elif tracked.last_token[i]:
                    self.metrics.inter_token(now - tracked.last_token[i])
                tracked.last_token[i] = now
                self.metrics.generated(len(new))
            logprobs = None if c.logprobs is None else tuple(c.logprobs[tracked.sent[i] :])
            tracked.sent[i] = len(c.token_ids)
            tracked.done[i] = c.finish_reason is not None
            choices.append(
                ChoiceUpdate(i, c.text, tuple(new), logprobs, c.finish_reason, c.stop_reason)
            )
        if out.finished:
            del self._tracked[out.request_id]
            reason = (
                out.outputs[0].finish_reason
                if len(out.outputs) == 1
                else ("stop" if all(c.finish_reason == "stop" for c in out.outputs) else "length")
            )
            assert reason is not None  # a finished completion has its reason
            self.metrics.finished(reason, now - tracked.arrival)
        if choices or out.finished:
            prompt_logprobs = (
                list(out.prompt_logprobs)
                if (out.finished and out.prompt_logprobs is not None)
                else None
            )
            posts.append(
                (tracked, Update(out.request_id, tuple(choices), out.finished, prompt_logprobs))
            )

    def _die(self, why: str, posts: list) -> None:
        self.dead = why
        self._fail_all(ServerError(why), posts)

    def _fail_all(self, error: ServerError, posts: list) -> None:
        for rid, tracked in list(self._tracked.items()):
            self.engine.abort_request(rid)
            self._unwait(tracked)
            posts.append((tracked, Update(rid, finished=True, error=error)))
        self._tracked.clear()

    def _post(self, posts: list[tuple[_Tracked, Update]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for tracked, update in posts:
            by_loop.setdefault(tracked.loop, []).append((tracked.queue, update))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _publish(self) -> None:
        scheduler = self.engine.scheduler
        blocks = scheduler.block_manager
        usable = len(blocks.blocks) - 1
        with self._cond:
            waiting = scheduler.num_waiting + sum(1 for c in self._inbox if c[0] == "add")
        self.metrics.publish(
            running=scheduler.num_running,
            waiting=waiting,
            kv_usage=(usable - blocks.num_free_blocks) / usable,
            preemptions=scheduler.num_preemptions,
            prefix_queries=blocks.prefix_cache_queries,
            prefix_hits=blocks.prefix_cache_hits,
            spec_drafts=scheduler.num_draft_tokens,
            spec_accepted=scheduler.num_accepted_tokens,
        )


def _deliver(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for queue, update in items:
        queue.put_nowait(update)
