"""Data-parallel serving on Ray: N engine replicas behind one HTTP front end.

```
 clients ── FastAPI + ReplicaSet (the `serve` process): routing, aborts, /health, /metrics
                │ Ray actor calls; each request's updates come back as a streaming generator
      ┌─────────┴──────────┬─────────────── ... ─┐
 EngineReplica 0     EngineReplica 1       EngineReplica N-1   Ray actors: one process each,
 LLM + EngineLoop    LLM + EngineLoop      ...                 on any node of the cluster
```

A replica is a whole engine (model, KV pool) with its own EngineLoop and Metrics
(`engine="i"`). ReplicaSet is shaped as an EngineLoop (submit, abort, stop, healthy, dead), so
Job and the routes use either. It sends each request to the replica with the fewest requests
in flight (ties in turn), passes aborts on, and when a replica's process dies, fails its
requests with a 500 that says so, marks it down (/health names it) and routes to the others.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
from itertools import count

from prometheus_client import CollectorRegistry, generate_latest

from ..errors import ClusterError
from ..ray import require_ray
from ..sampling_params import SamplingParams
from .engine_loop import EngineLoop, ServerError, Update
from .metrics import Metrics
from .served_model import ServedModel

HEALTH_TIMEOUT = 10.0  # seconds a replica may take to answer a health check


class EngineReplica:
    """One engine in a Ray actor's process (an async actor: its requests run concurrently on
    the actor's event loop, the engine steps in the EngineLoop's thread)."""

    def __init__(self, index: int, model_args: dict, served_name: str, max_waiting: int | None):
        from ..cli import make_llm

        llm = make_llm(argparse.Namespace(**model_args))
        self.model = ServedModel.of(llm)
        self.metrics = Metrics(served_name, engine=str(index))
        self.loop = EngineLoop(llm.engine, self.metrics, max_waiting)
        self.loop.start()
        self.active: dict[str, tuple[str, asyncio.Queue]] = {}  # front-end id -> engine id, queue

    def describe(self) -> dict:
        ray = require_ray()
        return {"model": self.model, "pid": os.getpid(), "node": ray.util.get_node_ip_address()}

    async def generate(self, rid: str, ids: list[int], params: SamplingParams):
        """The request's Updates (acceptance, new tokens, finish), until it finishes or the
        front end aborts it."""
        queue: asyncio.Queue = asyncio.Queue()
        try:
            engine_rid = self.loop.submit(ids, params, queue)
        except ServerError as e:
            yield Update(rid, finished=True, error=e)
            return
        self.active[rid] = (engine_rid, queue)
        finished = False
        try:
            while not finished:
                update = await queue.get()
                if update is None:  # aborted
                    return
                finished = update.finished
                yield dataclasses.replace(update, request_id=rid)
        finally:
            self.active.pop(rid, None)
            if not finished:
                self.loop.abort(engine_rid)

    def abort(self, rid: str) -> None:
        entry = self.active.get(rid)
        if entry is not None:
            self.loop.abort(entry[0])
            entry[1].put_nowait(None)

    def health(self) -> str | None:
        """None while the engine serves, else why it cannot."""
        return None if self.loop.healthy else (self.loop.dead or "its engine thread stopped")

    def metric_families(self) -> list:
        return list(self.metrics.registry.collect())

    def stop(self) -> None:
        self.loop.stop(wait=None)  # every request gets a 503 error, then the thread ends


class ReplicaSet:
    def __init__(self, actors: list, infos: list[dict]):
        self.actors, self.infos = actors, infos
        self.model: ServedModel = infos[0]["model"]
        self.load = [0] * len(actors)  # requests in flight per replica
        self.down: dict[int, str] = {}  # replica -> why it is down
        self.routes: dict[str, int] = {}  # request id -> its replica
        self._ids = count()
        self._turn = 0
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    # ---- EngineLoop's shape ----------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return len(self.down) < len(self.actors)

    @property
    def dead(self) -> str | None:
        if self.healthy:
            return None
        return "every engine replica is down: " + "; ".join(
            f"replica {i}: {why}" for i, why in sorted(self.down.items())
        )

    def submit(self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue) -> str:
        if self._stopping:
            raise ServerError("the server is shutting down", 503, "service_unavailable")
        live = [i for i in range(len(self.actors)) if i not in self.down]
        if not live:
            raise ServerError(self.dead or "no replica", 503, "service_unavailable")
        n = len(self.actors)
        i = min(live, key=lambda j: (self.load[j], (j - self._turn) % n))
        self._turn = (i + 1) % n
        rid = f"req-{next(self._ids)}"
        self.load[i] += 1
        self.routes[rid] = i
        task = asyncio.get_running_loop().create_task(
            self._relay(i, rid, prompt_ids, params, queue)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return rid

    def abort(self, request_id: str) -> None:
        i = self.routes.get(request_id)
        if i is not None and i not in self.down:
            self.actors[i].abort.remote(request_id)

    def stop(self, wait: float | None = 10.0) -> None:
        """Each replica aborts what it runs (a 503 error each); Ray's shutdown ends them."""
        self._stopping = True
        for i, actor in enumerate(self.actors):
            if i not in self.down:
                actor.stop.remote()

    # ---- the relay of one request ----------------------------------------------------------
    async def _relay(self, i: int, rid: str, ids: list[int], params, queue: asyncio.Queue) -> None:
        ray = require_ray()
        try:
            async for ref in self.actors[i].generate.remote(rid, ids, params):
                queue.put_nowait(await ref)
        except ray.exceptions.RayActorError as e:
            why = self._mark_down(i, e)
            error = ServerError(
                f"engine replica {i} died while serving this request ({why}); the other "
                "replicas go on serving: retry the request"
            )
            queue.put_nowait(Update(rid, finished=True, error=error))
        except Exception as e:  # noqa: BLE001 - whatever the call raised, the request fails
            error = ServerError(f"engine replica {i} failed: {type(e).__name__}: {e}")
            queue.put_nowait(Update(rid, finished=True, error=error))
        finally:
            self.load[i] -= 1
            self.routes.pop(rid, None)

    def _mark_down(self, i: int, e: BaseException) -> str:
        if i not in self.down:
            lines = [line for line in str(e).splitlines() if line.strip()]
            detail = lines[0][:200] if lines else ""
            self.down[i] = f"its actor died ({type(e).__name__}: {detail})"
        return self.down[i]

    # ---- /health and /metrics --------------------------------------------------------------
    async def check(self) -> list[dict]:
        """Asks every replica that is up; one entry per replica, a dead one with its reason."""
        ray = require_ray()

        async def ping(i: int) -> None:
            try:
                why = await asyncio.wait_for(self.actors[i].health.remote(), HEALTH_TIMEOUT)
            except ray.exceptions.RayActorError as e:
                self._mark_down(i, e)
                return
            except asyncio.TimeoutError:
                why = f"no answer to a health check within {HEALTH_TIMEOUT:.0f} s"
            if why:
                self.down[i] = why

        await asyncio.gather(*(ping(i) for i in range(len(self.actors)) if i not in self.down))
        report = []
        for i, info in enumerate(self.infos):
            entry: dict = {"engine": str(i), "status": "down" if i in self.down else "ok"}
            entry |= {"node": info["node"], "pid": info["pid"], "in_flight": self.load[i]}
            if i in self.down:
                entry["reason"] = self.down[i]
            report.append(entry)
        return report

    async def render_metrics(self) -> bytes:
        """Every live replica's samples, merged into one family per metric name (each sample
        labelled with its replica's engine="i")."""
        ray = require_ray()

        async def fetch(i: int) -> list:
            try:
                return await self.actors[i].metric_families.remote()
            except ray.exceptions.RayActorError as e:
                self._mark_down(i, e)
                return []

        live = [i for i in range(len(self.actors)) if i not in self.down]
        merged: dict = {}
        for families in await asyncio.gather(*(fetch(i) for i in live)):
            for family in families:
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(list(merged.values())))
        return generate_latest(registry)


class _Families:
    """A collector of metric families already gathered."""

    def __init__(self, families: list):
        self.families = families

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        return self.families


def connect_ray(address: str | None) -> None:
    """Connects to the Ray cluster at `address` (None: starts a local instance, whose processes
    end with the thread that calls this)."""
    ray = require_ray("--data-parallel-size")
    if ray.is_initialized():
        return
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit():  # host:port: fail now, not after Ray's minute of retries
        import socket

        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise ClusterError(_no_cluster(address, e)) from None
    try:
        ray.init(address=address, include_dashboard=False)
    except ConnectionError as e:
        raise ClusterError(_no_cluster(address, e)) from None


def _no_cluster(address: str | None, e: BaseException) -> str:
    return (
        f"--ray-address {address!r}: no Ray cluster answers there ({e}); start one with "
        "`ray start --head`, or leave --ray-address out for a local instance"
    )


def start_replicas(
    model_args: dict, served_name: str, size: int, cpus: float, max_waiting: int | None
) -> ReplicaSet:
    """Starts `size` EngineReplica actors of `cpus` CPUs each on the connected Ray cluster,
    and waits until every one has loaded its model."""
    ray = require_ray("--data-parallel-size")
    threads = str(max(1, int(cpus)))  # BLAS threads: as many as the CPUs Ray set aside
    env = {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    actor = ray.remote(num_cpus=cpus, max_concurrency=1000, runtime_env={"env_vars": env})(
        EngineReplica
    )
    actors = [actor.remote(i, model_args, served_name, max_waiting) for i in range(size)]
    try:
        infos = ray.get([a.describe.remote() for a in actors])
    except ray.exceptions.RayActorError as e:
        for a in actors:
            ray.kill(a)
        # the message ends with the replica's own error (its traceback comes before)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise ClusterError(
            f"an engine replica could not start: {lines[-1] if lines else type(e).__name__}"
        ) from None
    return ReplicaSet(actors, infos)
