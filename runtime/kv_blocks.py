"""Block bookkeeping for the paged KV cache: which blocks each KV row owns, how many the
pool holds, and when it grows or shrinks. Pure Python, no tensors (the cache applies the
decisions to its per-layer buffers).

A block is `block_size` consecutive positions of one sequence. Block 0 is the scratch block
(pads write there; it is never a sequence's), so sequence blocks are 1..capacity. Reserved
KV follows use, with this invariant after every `extend` and `release`:

    capacity <= allocated + used_tokens // (2 * block_size)      (headroom <= 50% of use)

and since a row of `n` tokens owns `ceil(n / block_size)` blocks, reserved positions stay
within `1.5 × used + one block per live row` (+ the scratch block). Growth leaves 25%
headroom so a decoding batch does not reallocate every block boundary; the pool never
exceeds `max_blocks` (every row at its longest: what the old per-row cache reserved up
front), so a row the scheduler admitted can always get its blocks.

    alloc = BlockAllocator(block_size=16, max_blocks=rows * ceil(max_len / 16))
    grow_to = alloc.extend(row, upto)          # new capacity when the pool must grow
    moves, shrink_to = alloc.release(row)      # block copies (src -> dst), then truncate
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shrink:
    """Compact the pool: copy block `src` to `dst` for each move, then keep `capacity`."""

    moves: tuple[tuple[int, int], ...]
    capacity: int


class BlockAllocator:
    def __init__(self, block_size: int, max_blocks: int) -> None:
        if block_size <= 0 or max_blocks <= 0:
            raise ValueError("block_size and max_blocks must be > 0")
        self.block_size = block_size
        self.max_blocks = max_blocks
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
        need = self.blocks_for(upto) - len(table)
        grown = None
        if need > len(self._free):
            target = self.allocated + need + self._headroom(4)
            grown = self._grow(min(self.max_blocks, target))
            if need > len(self._free):
                raise RuntimeError(f"KV pool exhausted: {need} blocks needed, "
                                   f"{self.max_blocks} in all (a scheduler bug)")
        for _ in range(max(0, need)):
            table.append(self._free.pop())
        return grown

    def release(self, row: int) -> Shrink | None:
        """Free `row`'s blocks; a `Shrink` when the pool now holds too much headroom."""
        for b in self.tables.pop(row, []):
            self._free.append(b)
        self.used_tokens -= self.lengths.pop(row, 0)
        self._free.sort(reverse=True)
        if self.capacity <= self.allocated + self._headroom(2):
            return None
        return self._shrink(self.allocated + self._headroom(4))

    # -- pool size --------------------------------------------------------------------------
    def _grow(self, capacity: int) -> int:
        self._free.extend(range(self.capacity + 1, capacity + 1))
        self._free.sort(reverse=True)
        self.capacity = max(self.capacity, capacity)
        return self.capacity

    def _shrink(self, capacity: int) -> Shrink:
        """Move live blocks above `capacity` into free ids at or below it."""
        low_free = sorted(b for b in self._free if b <= capacity)
        moves: list[tuple[int, int]] = []
        for table in self.tables.values():
            for i, b in enumerate(table):
                if b > capacity:
                    dst = low_free.pop(0)
                    moves.append((b, dst))
                    table[i] = dst
        used = {b for t in self.tables.values() for b in t}
        self._free = sorted((b for b in range(1, capacity + 1) if b not in used), reverse=True)
        self.capacity = capacity
        return Shrink(tuple(moves), capacity)
