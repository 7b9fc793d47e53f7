"""Block bookkeeping for the paged KV cache: which blocks each KV row owns, how many the
pool holds, when it grows or shrinks, and the per-adapter prefix cache. Pure Python, no
tensors (the cache applies the decisions to its per-layer buffers).

A block is `block_size` consecutive positions of one sequence. Block 0 is the scratch block
(pads write there; it is never a sequence's), so sequence blocks are 1..capacity. Reserved
KV follows use, with this invariant after every `extend` and compacting `release` (the
engine releases a step's finished rows and compacts once, at the end of the step):

    capacity <= allocated + used_tokens // (2 * block_size)      (headroom <= 50% of use)

where `allocated` counts blocks rows hold plus idle prefix-cache blocks (at most
`cache_blocks`). A row of `n` tokens owns `ceil(n / block_size)` blocks, so reserved
positions stay within `1.5 × used + one block per live row` (+ the scratch block and the
idle prefix blocks). Growth leaves 25% headroom so a decoding batch does not reallocate
every block boundary; the pool never exceeds `max_blocks` (every row at its longest, plus
`cache_blocks`), so a row the scheduler
admitted can always get its blocks: admission by free rows stays sufficient.

Stable pools (`stable=True`, with CUDA graphs: runtime/model/decode_graphs.py): a captured graph
holds the pools' addresses, so every reallocation costs a re-capture. Then the pool grows to
at least twice its capacity and never shrinks: at most ~log2(max_blocks) reallocations in a
process, and reserved KV stays at its peak instead of following use (the invariant above
does not hold).

Prefix cache (`cache_blocks > 0`): a full block of a prompt is published under a key that
chains the tenant, the adapter digest (or the base) and every token up to the block's end
(sha256), so a later row of the same tenant with the same adapter version and the same
leading tokens takes the same blocks (reference-counted, never written again: only full
prompt blocks are shared, and a row writes only past its cached prefix). A different
adapter, version or alias target has a different digest, so a different key: KV is never
shared across them. Nor across tenants: a hit is faster than a miss, so a shared cache
would let one tenant learn, by timing its own requests, which prompts another tenant sent.
Blocks no row holds stay cached, least recently used evicted first, up to `cache_blocks`.

    alloc = BlockAllocator(block_size=16, max_blocks=rows * ceil(max_len / 16))
    cached = alloc.match(row, tenant, digest, prompt)  # positions reused from the cache
    grow_to = alloc.extend(row, upto)          # new capacity when the pool must grow
    alloc.publish(row, tenant, digest, prompt, upto)   # full prompt blocks: cache them
    moves, shrink_to = alloc.release(row)      # block copies (src -> dst), then truncate
    alloc.release(row, compact=False); alloc.compact()   # many releases, one compaction
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Shrink:
    """Compact the pool: copy block `src` to `dst` for each move, then keep `capacity`."""

    moves: tuple[tuple[int, int], ...]
    capacity: int


class BlockAllocator:
    def __init__(self, block_size: int, max_blocks: int, cache_blocks: int = 0, *,
                 stable: bool = False) -> None:
        if block_size <= 0 or max_blocks <= 0 or cache_blocks < 0:
            raise ValueError("block_size and max_blocks must be > 0, cache_blocks >= 0")
        self.block_size = block_size
        self.stable = stable  # grow by doubling, never shrink (see the module doc)
        self.max_blocks = max_blocks + cache_blocks
        self.cache_blocks = cache_blocks
        self.refs: dict[int, int] = {}  # block -> rows holding it (shared prefix blocks > 1)
        self._keys: dict[bytes, int] = {}  # prefix key -> block
        self._key_of: dict[int, bytes] = {}  # block -> its prefix key
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, no row holds it (LRU)
        self.prefix_hit_tokens = 0  # prompt positions reused (counters: read by any thread)
        self.prefix_lookups = 0
        self.prefix_hits = 0
        self.capacity = 0  # sequence blocks the pool holds (ids 1..capacity)
        self._free: list[int] = []  # free ids, kept sorted descending (pop() = lowest)
        self.tables: dict[int, list[int]] = {}  # KV row -> its blocks, in position order
        self.lengths: dict[int, int] = {}  # KV row -> positions written (incl. this step)
        self.used_tokens = 0  # sum of `lengths` (kept as a counter: read by other threads)

    # -- accounting -------------------------------------------------------------------------
    @property
    def allocated(self) -> int:
        return self.capacity - len(self._free)

    def _headroom(self, share: int) -> int:
        """Spare blocks allowed: `used_tokens / share` positions' worth."""
        return self.used_tokens // (share * self.block_size)

    # -- rows -------------------------------------------------------------------------------
    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def extend(self, row: int, upto: int) -> int | None:
        """Make `row` own the blocks for positions `0..upto-1`; returns the new capacity
        when the pool had to grow (the caller grows its buffers first), else None."""
        table = self.tables.setdefault(row, [])
        before = self.lengths.get(row, 0)
        if upto > before:
            self.lengths[row] = upto
            self.used_tokens += upto - before
        need = self.need(row, upto)
        grown = self.make_room(need)
        while need > len(self._free) and self._idle:
            self._evict()
        if need > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {need} blocks needed, "
                               f"{self.max_blocks} in all (a scheduler bug)")
        for _ in range(need):
            b = self._free.pop()
            self.refs[b] = 1
            table.append(b)
        return grown

    def make_room(self, need: int) -> int | None:
        """Grow the pool so `need` more blocks are free (with headroom); the new capacity,
        or None when it did not grow. A step's rows ask once for all they need (`extend`
        asks for one row), so the pool is copied at most once per step."""
        if need <= len(self._free) or self.capacity >= self.max_blocks:
            return None
        # grow before evicting: `max_blocks` already counts `cache_blocks` idle prefix
        # blocks, so they make way only once the pool is at its limit
        target = self.allocated + need + self._headroom(4)
        if self.stable:
            target = max(target, 2 * self.capacity)
        return self._grow(min(self.max_blocks, target))

    def need(self, row: int, upto: int) -> int:
        """Blocks `row` still lacks to hold positions `0..upto-1`."""
        return max(0, self.blocks_for(upto) - len(self.tables.get(row, ())))

    def release(self, row: int, *, compact: bool = True) -> Shrink | None:
        """Free `row`'s blocks; a `Shrink` when the pool now holds too much headroom
        (`compact=False`: never; the caller calls `compact` once for many releases)."""
        for b in self.tables.pop(row, []):
            self.refs[b] -= 1
            if self.refs[b] > 0:
                continue
            del self.refs[b]
            if b in self._key_of:
                self._idle[b] = None  # most recently used last
            else:
                self._free.append(b)
        self.used_tokens -= self.lengths.pop(row, 0)
        while len(self._idle) > self.cache_blocks:
            self._evict()
        self._free.sort(reverse=True)
        return self.compact() if compact else None

    def compact(self) -> Shrink | None:
        """A `Shrink` when the pool holds more headroom than the invariant allows."""
        if self.stable or self.capacity <= self.allocated + self._headroom(2):
            return None
        return self._shrink(self.allocated + self._headroom(4))

    # -- pool size --------------------------------------------------------------------------
    def _grow(self, capacity: int) -> int:
        self._free.extend(range(self.capacity + 1, capacity + 1))
        self._free.sort(reverse=True)
        self.capacity = max(self.capacity, capacity)
        return self.capacity

    def _shrink(self, capacity: int) -> Shrink:
        """Move held blocks (rows' and idle cached ones) above `capacity` into free ids at
        or below it; a block shared by several rows moves once."""
        held = {b for t in self.tables.values() for b in t} | set(self._idle)
        low_free = sorted(b for b in range(1, capacity + 1) if b not in held)
        where = {b: low_free.pop(0) for b in sorted(held) if b > capacity}
        for table in self.tables.values():
            table[:] = [where.get(b, b) for b in table]
        self.refs = {where.get(b, b): n for b, n in self.refs.items()}
        self._idle = OrderedDict((where.get(b, b), None) for b in self._idle)
        self._key_of = {where.get(b, b): k for b, k in self._key_of.items()}
        self._keys = {k: b for b, k in self._key_of.items()}
        self._free = sorted((b for b in range(1, capacity + 1)
                             if b not in self.refs and b not in self._idle), reverse=True)
        self.capacity = capacity
        return Shrink(tuple(where.items()), capacity)

    # -- prefix cache -----------------------------------------------------------------------
    def _chain(self, tenant: str, digest: str | None, prompt: Sequence[int],
               blocks: int) -> list[bytes]:
        """Keys of the first `blocks` full blocks of `prompt` of `tenant` under `digest`."""
        h = hashlib.sha256(f"tenant:{len(tenant)}:{tenant}|".encode())
        h.update(f"adapter:{digest}".encode() if digest else b"base")
        bs, keys = self.block_size, []
        for i in range(blocks):
            h.update(b"|" + ",".join(map(str, prompt[i * bs:(i + 1) * bs])).encode())
            keys.append(h.copy().digest())
        return keys

    def match(self, row: int, tenant: str, digest: str | None, prompt: Sequence[int]) -> int:
        """Give a new `row` the cached blocks of `prompt`'s longest cached prefix (at least
        one prompt token is left to compute: its logits pick the first token); returns
        the positions reused."""
        if not self.cache_blocks or row in self.tables:
            return 0
        self.prefix_lookups += 1
        found: list[int] = []
        for key in self._chain(tenant, digest, prompt, (len(prompt) - 1) // self.block_size):
            b = self._keys.get(key)
            if b is None:
                break
            found.append(b)
        if not found:
            return 0
        for b in found:
            self._idle.pop(b, None)
            self.refs[b] = self.refs.get(b, 0) + 1
        n = len(found) * self.block_size
        self.tables[row] = found
        self.lengths[row] = n
        self.used_tokens += n
        self.prefix_hits += 1
        self.prefix_hit_tokens += n
        return n

    def publish(self, row: int, tenant: str, digest: str | None, prompt: Sequence[int],
                upto: int) -> None:
        """`row` has written positions `0..upto-1` of `prompt`: cache its full blocks."""
        if not self.cache_blocks:
            return
        table = self.tables.get(row, [])
        full = min(upto, len(prompt)) // self.block_size
        for i, key in enumerate(self._chain(tenant, digest, prompt, full)):
            b = table[i]
            if key in self._keys or b in self._key_of:
                continue  # already cached (maybe another row's copy of the same prefix)
            self._keys[key] = b
            self._key_of[b] = key

    def _evict(self) -> None:
        """Drop the least recently used idle cached block."""
        b, _ = self._idle.popitem(last=False)
        del self._keys[self._key_of.pop(b)]
        self._free.append(b)
        self._free.sort(reverse=True)
