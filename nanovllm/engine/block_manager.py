"""A fixed pool of KV-cache blocks with reference counts and a prefix cache of full blocks."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

from nanovllm.engine.sequence import Sequence

NULL_BLOCK = 0  # reserved: never allocated or freed; padded block tables point at it


def hash_block_tokens(parent_hash: bytes, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(parent_hash, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and its K/V computed ("sealed")
    token_ids: tuple[int, ...] = ()
    parent: int = 0  # serial of the sealed block before it (0: first block of a sequence)
    serial: int = 0  # unique per sealing, so a child never outlives its parent's contents


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        # off: a sealed block serves only the siblings of its request, so once freed it is
        # reused first (its memory already touched), not kept for a later request
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_cache_queries = 0  # full blocks looked up at admission (reusable at most)
        self.prefix_cache_hits = 0  # of those, reused from the cache
        self._serials = count(1)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            hashes.append(
                hash_block_tokens(hashes[-1] if j else b"", seq.token_ids[j * bs : (j + 1) * bs])
            )
        return hashes[i]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The longest chain of cached full blocks of seq, leaving at least one token to compute."""
        bs, hits, parent = self.block_size, [], 0
        for i in range((seq.num_tokens - 1) // bs):
            block_id = self.hash_to_block.get(self._block_hash(seq, i))
            if block_id is None:
                break
            block = self.blocks[block_id]
            ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            if block.parent != parent or block.token_ids != ids:  # a hash collision
                break
            hits.append(block_id)
            parent = block.serial
        return hits

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, cached: list[int], num_tokens: int) -> bool:
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        new = -(-num_tokens // self.block_size) - len(cached)
        return revived + new <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | None = None) -> None:
        """Give a new sequence the cached blocks, then fresh ones up to num_tokens tokens."""
        assert not seq.block_table
        if cached is not None:
            self.prefix_cache_queries += (seq.num_tokens - 1) // self.block_size
            self.prefix_cache_hits += len(cached)
            for block_id in cached:
                block = self.blocks[block_id]
                if block.ref_count == 0:
                    del self.free_blocks[block_id]
                block.ref_count += 1
                seq.block_table.append(block_id)
        self.append(seq, num_tokens)

    def append(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover num_tokens tokens."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            after = seq.block_table[-1] + 1 if seq.block_table else NULL_BLOCK  # (never free)
            if after in self.free_blocks and not self._kept_for_cache(after):
                # the block after the sequence's last: its context stays one run of slots,
                # which the attention reads as a slice of the pool instead of gathering it
                block_id = after
                del self.free_blocks[after]
            else:
                block_id, _ = self.free_blocks.popitem(last=False)  # least recently freed
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids, block.parent, block.serial = None, (), 0, 0
            block.ref_count = 1
            seq.block_table.append(block_id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Shrink seq's block table to the blocks num_tokens tokens need (speculative
        decoding: the tail blocks that held only rejected proposals, never sealed)."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            if not self._kept_for_cache(block_id):  # useless: reuse first
                self.free_blocks.move_to_end(block_id, last=False)

    def _kept_for_cache(self, block_id: int) -> bool:
        """A free block to keep for the prefix cache rather than reuse first (caching off, a
        sealed one serves at most a sibling not admitted yet, which revives it if it is still
        free)."""
        return self.prefix_caching and self._is_cached(block_id)

    def _is_cached(self, block_id: int) -> bool:
        """The block holds a prefix the cache can still hand out."""
        block = self.blocks[block_id]
        return block.hash is not None and self.hash_to_block.get(block.hash) == block_id

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail is evicted first
            if block_id != NULL_BLOCK:  # already freed out of the window
                self._release(block_id)
        seq.block_table.clear()

    def free_out_of_window(self, seq: Sequence, window: int) -> None:
        """Free the blocks no later query of seq can see: every position in them is before
        num_computed_tokens - window + 1, the first key the next query reads. Their entries
        become the null block; a sealed block stays in the prefix cache until evicted. The
        last full block is kept: the next block to be sealed records its serial as parent."""
        bs, table = self.block_size, seq.block_table
        first_needed = max(seq.num_computed_tokens - window + 1, 0)
        for i in range(min(first_needed // bs, seq.num_computed_tokens // bs - 1, len(table))):
            if table[i] != NULL_BLOCK:
                self._release(table[i])
                table[i] = NULL_BLOCK

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Seal the blocks that became full and computed, and register them in the prefix cache."""
        bs, table = self.block_size, seq.block_table
        first = num_full = seq.num_computed_tokens // bs
        while first > 0 and self.blocks[table[first - 1]].hash is None:
            if table[first - 1] == NULL_BLOCK:  # freed out of the window, so sealed before
                break
            first -= 1
        for i in range(first, num_full):
            block = self.blocks[table[i]]
            block.hash = self._block_hash(seq, i)
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block.parent = self.blocks[table[i - 1]].serial if i else 0
            block.serial = next(self._serials)
            self.hash_to_block.setdefault(block.hash, block.block_id)
