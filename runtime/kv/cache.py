"""KV cache for continuous batching: a paged (block) cache shared by the running sequences.

The Hugging Face model is driven as-is; only three of its inputs are ours each step:
explicit `position_ids`, a 4D attention mask (models return a 4D mask untouched), and
`BlockKVCache`, a `transformers.Cache` whose `update` writes the step's keys/values into
fixed-size blocks of a per-layer pool and hands back just the rows in this step, gathered
to the longest sequence. Blocks are taken as a sequence grows and returned when it ends
(`kv_blocks.BlockAllocator`), so reserved KV follows what live sequences use instead of
`max_batch × max_seq_len`. Every sequence keeps its own absolute positions, so rows of
different lengths, prefill chunks and single decode tokens can share one forward.

A step's rows are left-padded to the longest chunk `Q`, so the last column of the logits is
every row's next-token distribution. Pad tokens write to the scratch block (never read
unmasked) and attend only to key 0 (a fully masked row would give NaN).

    layout = build_layout(feeds)                 # feeds: RowFeed(kv_row, start, token_ids)
    cache.reserve(feeds); cache.set_layout(layout)
    model(input_ids=layout.input_ids, position_ids=layout.position_ids,
          attention_mask=layout.mask(bool_mask, dtype), cache=cache, use_cache=True,
          logits_to_keep=1)
    cache.release(row)                           # the sequence ended: its blocks go back
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from loraplex.runtime.kv.blocks import BlockAllocator


@dataclass(frozen=True)
class RowFeed:
    """Tokens one sequence feeds this step: a prefill chunk or the single last token."""

    row: int  # KV row of the sequence
    start: int  # absolute position of token_ids[0] (tokens already in the cache)
    token_ids: Sequence[int]


@dataclass(frozen=True)
class StepLayout:
    """Tensors for one forward over `B` rows left-padded to `Q` tokens."""

    rows: torch.Tensor  # [B] long: KV row of each batch row
    input_ids: torch.Tensor  # [B, Q] long: pad id 0 where not valid
    position_ids: torch.Tensor  # [B, Q] long: absolute positions (0 for pads)
    valid: torch.Tensor  # [B, Q] bool
    kv_len: int  # L: keys gathered per row (max over rows of start + len)
    row_ids: tuple[int, ...] = ()  # the same KV rows on the host (no device read to use them)

    def mask(self, *, boolean: bool, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, Q, L] mask: query at position p sees keys 0..p of its own row."""
        keys = torch.arange(self.kv_len, device=self.position_ids.device)  # [L]
        allowed = keys[None, None, :] <= self.position_ids[:, :, None]  # [B, Q, L]
        pad_row = keys[None, None, :] == 0  # [1, 1, L]
        allowed = torch.where(self.valid[:, :, None], allowed, pad_row)  # [B, Q, L]
        allowed = allowed[:, None]  # [B, 1, Q, L]
        if boolean:
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, neg)


def build_layout(chunks: Sequence[RowFeed], device: torch.device | str = "cpu") -> StepLayout:
    """Left-pad `chunks` into one step."""
    q = max(len(c.token_ids) for c in chunks)
    b = len(chunks)
    row_ids = tuple(c.row for c in chunks)
    rows = torch.as_tensor(row_ids, dtype=torch.long).to(device)  # [B]
    if q == 1:  # decode: one token per row, nothing to pad
        starts = [c.start for c in chunks]
        pos = torch.as_tensor(starts, dtype=torch.long)[:, None]  # [B, 1]
        return StepLayout(
            rows=rows, input_ids=torch.as_tensor([c.token_ids[0] for c in chunks],
                                                 dtype=torch.long)[:, None].to(device),
            position_ids=pos.to(device),
            valid=torch.ones((b, 1), dtype=torch.bool, device=device),
            kv_len=max(starts) + 1, row_ids=row_ids)
    input_ids = torch.zeros((b, q), dtype=torch.long)  # [B, Q]
    position_ids = torch.zeros((b, q), dtype=torch.long)  # [B, Q]
    valid = torch.zeros((b, q), dtype=torch.bool)  # [B, Q]
    kv_len = 0
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        input_ids[i, q - n:] = torch.as_tensor(list(c.token_ids), dtype=torch.long)
        position_ids[i, q - n:] = torch.arange(c.start, c.start + n)
        valid[i, q - n:] = True
        kv_len = max(kv_len, c.start + n)
    return StepLayout(rows=rows, input_ids=input_ids.to(device),
                      position_ids=position_ids.to(device), valid=valid.to(device),
                      kv_len=kv_len, row_ids=row_ids)


class BlockKVCache(Cache):
    """Paged KV: per layer one pool of positions `[H, (capacity + 1) * block_size, D]`
    (block 0 is the pads' scratch), a block table per KV row (`kv_blocks.BlockAllocator`).

    Before a forward the runner calls `reserve(feeds)` (blocks for the step's tokens, the
    pools grown when needed) and `set_layout(layout)`; each layer's `update` writes the
    step's keys/values through the block tables and gathers every row's positions
    `0..L-1` into the contiguous `[B, H, L, D]` view HF attention expects (positions past
    a row's length read the scratch block or stale data, and are masked). `release(row)`
    returns a finished sequence's blocks and compacts the pools when they hold too much
    headroom, so reserved KV follows what live sequences use. Pools are allocated by the
    first forward (the engine's warm-up), from the shapes the model produces.
    """

    def __init__(self, num_layers: int, rows: int, max_len: int, block_size: int = 16,
                 prefix_cache_blocks: int = 0, *, stable: bool = False) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.num_rows = rows
        self.max_len = max_len
        self.block_size = block_size
        self.blocks = BlockAllocator(block_size, rows * -(-max_len // block_size),
                                     prefix_cache_blocks, stable=stable)
        # +1 whenever a pool tensor is replaced (allocated, grown, compacted): a CUDA graph
        # holds the old addresses, so the decode graphs compare it before each replay
        self.generation = 0
        # head-major, so each (row, head) gathers into a contiguous [L, D] for attention
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each [H, (C+1)*bs, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers  # each [H, (C+1)*bs, Dv]
        self._write: torch.Tensor | None = None  # [B, Q] flat pool index per fed token
        self._read_blocks: torch.Tensor | None = None  # [B*W] block ids, row by row
        self._rows_read = 0  # B of the bound step
        self._flat_read: tuple[tuple[int, int], torch.Tensor] | None = None  # [B*H*W]
        self._kv_len = 0

    def __len__(self) -> int:
        return self.num_layers

    # -- before a forward ------------------------------------------------------------------
    def reserve(self, feeds: Sequence[RowFeed]) -> None:
        """Blocks for every position the step writes (grows the pools once when needed)."""
        grown = self.blocks.make_room(sum(self.blocks.need(f.row, f.start + len(f.token_ids))
                                          for f in feeds))
        if grown is not None:
            self._resize(grown)
        for f in feeds:
            grown = self.blocks.extend(f.row, f.start + len(f.token_ids))
            if grown is not None:  # not after make_room (kept so a change cannot skip a resize)
                self._resize(grown)

    def set_layout(self, layout: StepLayout) -> None:
        """Flat pool indices for this step's writes `[B, Q]`; block ids it reads `[B*W]`."""
        rows = layout.row_ids  # host copy: no device sync per step
        width = -(-layout.kv_len // self.block_size)
        table = torch.tensor(self.block_ids(rows, width), dtype=torch.long)  # [B*W]
        table = table.view(len(rows), width).to(layout.position_ids.device)  # [B, W]
        self.bind(table, layout.position_ids, layout.valid, layout.kv_len)

    def block_ids(self, rows: Sequence[int], width: int) -> list[int]:
        """Host block table, row-major `[len(rows) * width]`: each KV row's first `width`
        blocks, then 0 (the scratch block); a row without blocks (a pad, -1) is all 0."""
        out: list[int] = []
        for r in rows:
            t = self.blocks.tables.get(r, [])[:width]
            out += t
            out += [0] * (width - len(t))
        return out

    def bind(self, table: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
             kv_len: int) -> None:
        """The device half of `set_layout`: `table # [B, W]` block ids, `position_ids` and
        `valid # [B, Q]`. Tensor ops only, so the static decode path runs it inside a
        captured CUDA graph, on its fixed input buffers."""
        bs, width = self.block_size, table.shape[1]
        self._read_blocks = table.reshape(-1)  # [B*W]: each row's blocks, then scratch
        self._rows_read = table.shape[0]
        self._flat_read = None  # per-head block ids, made by the first layer's read
        blk = table.gather(1, (position_ids // bs).clamp(max=width - 1))  # [B, Q]
        self._write = torch.where(valid, blk * bs + position_ids % bs, 0)  # pads -> scratch
        self._kv_len = kv_len

    # -- the model's calls -----------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `key_states # [B, H, Q, D]` to the pool; return `[B, H, L, D]` each."""
        if self._read_blocks is None:
            raise RuntimeError("BlockKVCache.set_layout must be called before a forward")
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states, value_states)
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        return self._write_read(kb, key_states), self._write_read(vb, value_states)

    def _write_read(self, pool: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Write `states # [B, H, Q, D]` into `pool # [H, P, D]`; return every row's
        positions `0..L-1` as `[B, H, L, D]` (pads all write the scratch block, whichever
        lands there).

        The read is one `index_select` over the pool seen as `[H * (C+1), bs, D]` blocks,
        in `(row, head, block)` order, so the copy lands batch-major and each (row, head)
        is one contiguous `[L, D]`: 2.5x faster on CPU than selecting blocks per head into a
        head-major copy (120 vs 320 us for 32 rows of 4 blocks, 16 heads), and what
        attention reads best."""
        b, h, q, d = states.shape
        src = states.permute(1, 0, 2, 3).reshape(h, b * q, d).to(pool.dtype)  # [H, B*Q, D]
        pool.index_copy_(1, self._write.reshape(-1), src)
        flat = pool.view(-1, self.block_size, d)  # [H*(C+1), bs, D]
        out = flat.index_select(0, self._head_blocks(h, pool.shape[1] // self.block_size))
        return out.view(b, h, -1, d)[:, :, :self._kv_len]  # [B, H, L, D]

    def _head_blocks(self, heads: int, blocks: int) -> torch.Tensor:
        """`[B*H*W]` flat block ids `h * blocks + table[b, w]`, row by row then head by head;
        made once per step and shape (every layer's pools have the same)."""
        if self._flat_read is None or self._flat_read[0] != (heads, blocks):
            table = self._read_blocks.view(self._rows_read, -1)  # [B, W]
            base = torch.arange(heads, device=table.device) * blocks  # [H]
            ids = (base[None, :, None] + table[:, None, :]).reshape(-1)  # [B*H*W]
            self._flat_read = ((heads, blocks), ids)
        return self._flat_read[1]

    # -- after a sequence ------------------------------------------------------------------
    def release(self, row: int, *, compact: bool = True) -> None:
        """Return `row`'s blocks; compact and shrink the pools when headroom is too big
        (`compact=False`: later, by one `compact()` for all of a step's releases)."""
        self.blocks.release(row, compact=False)
        if compact:
            self.compact()

    def compact(self) -> None:
        """Move blocks down and shrink the pools when they hold too much headroom (each
        compaction copies every pool, so the engine does it once per step)."""
        shrink = self.blocks.compact()
        if shrink is None:
            return
        bs = self.block_size
        for bufs in (self.keys, self.values):
            for i, buf in enumerate(bufs):
                if buf is None:
                    continue
                for src, dst in shrink.moves:
                    buf[:, dst * bs:(dst + 1) * bs] = buf[:, src * bs:(src + 1) * bs]
                bufs[i] = buf[:, :(shrink.capacity + 1) * bs].clone()
        self.generation += 1

    # -- memory ----------------------------------------------------------------------------
    def _allocate(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = (self.blocks.capacity + 1) * self.block_size
        self.keys[layer_idx] = torch.zeros((k.shape[1], n, k.shape[3]), dtype=k.dtype,
                                           device=k.device)
        self.values[layer_idx] = torch.zeros((v.shape[1], n, v.shape[3]), dtype=v.dtype,
                                             device=v.device)
        self.generation += 1

    def _resize(self, capacity: int) -> None:
        n = (capacity + 1) * self.block_size
        for bufs in (self.keys, self.values):
            for i, buf in enumerate(bufs):
                if buf is not None and buf.shape[1] < n:
                    grown = buf.new_zeros((buf.shape[0], n, buf.shape[2]))
                    grown[:, :buf.shape[1]] = buf
                    bufs[i] = grown
        self.generation += 1

    def position_bytes(self) -> int:
        """KV bytes of one position across all layers (0 before the warm-up)."""
        return sum(t[:, 0].numel() * t.element_size() for t in (*self.keys, *self.values)
                   if t is not None)

    def nbytes(self) -> int:
        """Bytes the pools hold (reserved), the scratch block included."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values)
                   if t is not None)

    def limit_bytes(self) -> int:
        """The most the pools may hold (`max_blocks`, every row at `max_len`)."""
        return self.blocks.max_blocks * self.block_size * self.position_bytes()

    def used_bytes(self) -> int:
        """Bytes of the positions live sequences have written."""
        return self.blocks.used_tokens * self.position_bytes()

    # The model asks these only when it builds its own mask or positions; we pass both.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return False


class RowAllocator:
    """Hands out KV rows; lowest free first, so running rows stay mostly contiguous."""

    def __init__(self, rows: int) -> None:
        self._free = list(range(rows))

    def take(self) -> int | None:
        if not self._free:
            return None
        self._free.sort()
        return self._free.pop(0)

    def free_rows(self) -> list[int]:
        """The free rows, lowest first (what the scheduler hands to the requests it admits)."""
        return sorted(self._free)

    def claim(self, row: int) -> None:
        """Take a row the scheduler chose (it must be free)."""
        self._free.remove(row)

    def give(self, row: int) -> None:
        if row not in self._free:
            self._free.append(row)

    @property
    def free(self) -> int:
        return len(self._free)
