"""KV cache for continuous batching: one pre-allocated row per running sequence.

The Hugging Face model is driven as-is; only three of its inputs are ours each step:
explicit `position_ids`, a 4D attention mask (models return a 4D mask untouched), and
`RowKVCache`, a `transformers.Cache` whose `update` scatters the step's keys/values into
per-sequence rows and hands back just the rows in this step, gathered to the longest
sequence. Every sequence keeps its own absolute positions, so rows of different lengths,
prefill chunks and single decode tokens can share one forward.

A step's rows are left-padded to the longest chunk `Q`, so the last column of the logits is
every row's next-token distribution. Pad tokens write to a scratch column past
`max_len` (never read) and attend only to key 0 (a fully masked row would give NaN).

    layout = build_layout(feeds, max_len)        # feeds: RowFeed(kv_row, start, token_ids)
    cache.set_layout(layout.rows, layout.cache_pos, layout.kv_len, layout.first_row)
    model(input_ids=layout.input_ids, position_ids=layout.position_ids,
          attention_mask=layout.mask(bool_mask, dtype), cache=cache, use_cache=True,
          logits_to_keep=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


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
    cache_pos: torch.Tensor  # [B, Q] long: column written in the KV row (scratch for pads)
    valid: torch.Tensor  # [B, Q] bool
    kv_len: int  # L: keys gathered per row (max over rows of start + len)
    first_row: int | None = None  # set when rows are first_row .. first_row+B-1 (no gather)

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


def build_layout(chunks: Sequence[RowFeed], max_len: int,
                 device: torch.device | str = "cpu") -> StepLayout:
    """Left-pad `chunks` into one step. `max_len` is the scratch column for pads."""
    q = max(len(c.token_ids) for c in chunks)
    b = len(chunks)
    row_list = [c.row for c in chunks]
    first_row = row_list[0] if row_list == list(range(row_list[0], row_list[0] + b)) else None
    if q == 1:  # decode: one token per row, nothing to pad
        starts = [c.start for c in chunks]
        pos = torch.as_tensor(starts, dtype=torch.long)[:, None]  # [B, 1]
        return StepLayout(
            rows=torch.as_tensor(row_list, dtype=torch.long).to(device),
            input_ids=torch.as_tensor([c.token_ids[0] for c in chunks],
                                      dtype=torch.long)[:, None].to(device),
            position_ids=pos.to(device), cache_pos=pos.to(device),
            valid=torch.ones((b, 1), dtype=torch.bool, device=device),
            kv_len=max(starts) + 1, first_row=first_row)
    input_ids = torch.zeros((b, q), dtype=torch.long)  # [B, Q]
    position_ids = torch.zeros((b, q), dtype=torch.long)  # [B, Q]
    cache_pos = torch.full((b, q), max_len, dtype=torch.long)  # [B, Q]
    valid = torch.zeros((b, q), dtype=torch.bool)  # [B, Q]
    kv_len = 0
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        pos = torch.arange(c.start, c.start + n)  # [n]
        input_ids[i, q - n:] = torch.as_tensor(list(c.token_ids), dtype=torch.long)
        position_ids[i, q - n:] = pos
        cache_pos[i, q - n:] = pos
        valid[i, q - n:] = True
        kv_len = max(kv_len, c.start + n)
    rows = torch.as_tensor(row_list, dtype=torch.long)  # [B]
    return StepLayout(rows=rows.to(device), input_ids=input_ids.to(device),
                      position_ids=position_ids.to(device), cache_pos=cache_pos.to(device),
                      valid=valid.to(device), kv_len=kv_len, first_row=first_row)


class RowKVCache(Cache):
    """Per-layer key/value buffers `[rows, kv_heads, max_len + 1, head_dim]`, indexed by KV
    row (one per running sequence; "slot" always means an adapter slot in loraplex).

    Buffers are allocated by the first forward (the engine's warm-up), from the shapes the
    model produces, so any decoder-only attention layout works; afterwards nothing is
    allocated but the per-step gather. The extra column `max_len` is the pads' scratch.
    """

    def __init__(self, num_layers: int, rows: int, max_len: int) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.num_rows = rows
        self.max_len = max_len
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each [N, H, S+1, D]
        self.values: list[torch.Tensor | None] = [None] * num_layers  # each [N, H, S+1, Dv]
        self._rows: torch.Tensor | None = None  # [B]
        self._cache_pos: torch.Tensor | None = None  # [B, Q]
        self._kv_len = 0
        self._contiguous: int | None = None  # first row when rows == lo..lo+B-1

    def __len__(self) -> int:
        return self.num_layers

    def set_layout(self, rows: torch.Tensor, cache_pos: torch.Tensor, kv_len: int,
                   first_row: int | None = None) -> None:
        """Where this step's keys go: `rows # [B]`, `cache_pos # [B, Q]`, gather `kv_len`;
        `first_row` when rows are consecutive (the gather becomes a view)."""
        self._rows, self._cache_pos, self._kv_len = rows, cache_pos, kv_len
        self._contiguous = first_row

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Scatter `key_states # [B, H, Q, D]` into the rows; return `[B, H, L, D]` each."""
        if self._rows is None:
            raise RuntimeError("RowKVCache.set_layout must be called before a forward")
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, key_states, value_states)
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        rows = self._rows[:, None]  # [B, 1]
        kb[rows, :, self._cache_pos] = key_states.transpose(1, 2).to(kb.dtype)  # [B, Q, H, D]
        vb[rows, :, self._cache_pos] = value_states.transpose(1, 2).to(vb.dtype)
        return self._gather(kb), self._gather(vb)

    def _gather(self, buf: torch.Tensor) -> torch.Tensor:
        b = self._rows.shape[0]
        if self._contiguous is not None:
            return buf[self._contiguous:self._contiguous + b, :, :self._kv_len]  # view
        return buf[:, :, :self._kv_len].index_select(0, self._rows)  # [B, H, L, D]

    def _allocate(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        shape_k = (self.num_rows, k.shape[1], self.max_len + 1, k.shape[3])
        shape_v = (self.num_rows, v.shape[1], self.max_len + 1, v.shape[3])
        self.keys[layer_idx] = torch.zeros(shape_k, dtype=k.dtype, device=k.device)
        self.values[layer_idx] = torch.zeros(shape_v, dtype=v.dtype, device=v.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values)
                   if t is not None)

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
