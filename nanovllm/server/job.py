"""Job: the engine requests behind one HTTP request (one per prompt), and their updates."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ..sampling_params import SamplingParams
from .engine_loop import EngineLoop, Update

if TYPE_CHECKING:
    from .replicas import ReplicaSet


class Job:
    def __init__(self, loop: EngineLoop | ReplicaSet):
        self.loop = loop
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.index: dict[str, int] = {}  # request id -> prompt index
        self.unfinished: set[str] = set()
        self._early: list[Update] = []  # outputs that came while others were being accepted

    async def start(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Submit every prompt and wait until the engine accepted them all; on any refusal
        abort the others and raise its ServerError."""
        try:
            for i, ids in enumerate(prompts):
                rid = self.loop.submit(ids, params, self.queue)
                self.index[rid] = i
                self.unfinished.add(rid)
            pending = set(self.unfinished)
            while pending:
                update = await self.queue.get()
                if update.error is not None:
                    self.unfinished.discard(update.request_id)
                    raise update.error
                if update.choices or update.finished:
                    self._early.append(update)
                else:  # the acceptance
                    pending.discard(update.request_id)
        except BaseException:
            self.abort()
            raise

    async def updates(self) -> AsyncIterator[tuple[int, Update]]:
        """(prompt index, update) until every request finished; a failed request ends the
        job by raising its error."""
        while self.unfinished:
            update = self._early.pop(0) if self._early else await self.queue.get()
            if update.finished:
                self.unfinished.discard(update.request_id)
            if update.error is not None:
                raise update.error
            yield self.index[update.request_id], update

    def abort(self) -> None:
        for rid in self.unfinished:
            self.loop.abort(rid)
        self.unfinished.clear()
