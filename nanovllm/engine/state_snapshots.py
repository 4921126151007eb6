"""Recurrent-state snapshots at block boundaries: how a hybrid model's prefix cache resumes.

A Mamba layer's state after a prefix is one fixed-size array, not a row per token, so a
cached chain of full blocks gives the attention layers their K/V but not the Mamba layers
their state. A snapshot is that state (every Mamba layer's conv and SSM state) saved after
the last token of a sealed block, in a state slot of its own. A new sequence may resume from
a cached chain only where the chain's last block has a snapshot.

Snapshots are found by the block they end at: its id and the serial it was sealed with, so a
block that was evicted and sealed again with other tokens is never taken for the old one.
Their slots are reused least recently used first. A snapshot a step reads is pinned until
that step is done, so a step never overwrites a state that another row of it reads.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable

BlockKey = tuple[int, int]  # (block id, serial of its sealing)


class StateSnapshots:
    def __init__(self, slots: Iterable[int]) -> None:
        self.slots = list(slots)
        self.free: deque[int] = deque(self.slots)
        self.by_block: OrderedDict[BlockKey, int] = OrderedDict()  # least recently used first
        self.pins: Counter[int] = Counter()  # slot -> steps reading it
        self.num_saved = 0  # snapshots bound to a block
        self.num_resumed = 0  # sequences that resumed from one

    def __bool__(self) -> bool:
        return bool(self.slots)

    def find(self, key: BlockKey) -> int | None:
        """The slot holding the state after this block, marked as just used."""
        slot = self.by_block.get(key)
        if slot is not None:
            self.by_block.move_to_end(key)
        return slot

    def take(self, live: Callable[[BlockKey], bool]) -> int | None:
        """A slot for a new snapshot: a free one, else one whose block is gone (`live` says
        no), else the least recently used unpinned one; None if every slot is pinned."""
        if self.free:
            return self.free.popleft()
        unpinned = [k for k, s in self.by_block.items() if not self.pins[s]]
        victim = next((k for k in unpinned if not live(k)), unpinned[0] if unpinned else None)
        return None if victim is None else self.by_block.pop(victim)

    def bind(self, key: BlockKey, slot: int) -> None:
        """The state after block `key` is now in `slot` (written by the step just done)."""
        if key in self.by_block:  # the same sealing holds the same tokens: one copy is enough
            self.free.append(slot)
            return
        self.by_block[key] = slot
        self.num_saved += 1

    def release(self, slot: int) -> None:
        """A slot taken for a snapshot that was not saved after all."""
        self.free.append(slot)

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self.num_resumed += 1

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if not self.pins[slot]:
            del self.pins[slot]
