"""How adapters reach the pool's tiers without stalling the engine thread.

- registry -> host: `LoaderThreads` runs `load_fn(version) -> HostAdapter` (registry read,
  digest check, prepare: `host_loader.HostLoader`) on a small thread pool; the engine
  thread starts loads and takes the finished ones (`finished()`), so a cold load never
  runs on the engine thread.
- host -> device slot: on CUDA, `copy_stream` runs a slot write on the pool's own stream.

`AdapterPool` (pool.py) owns the tiers and decides what goes where; this module only runs
the loads and the copies.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loraplex import peft_format

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion


@dataclass
class HostAdapter:
    """An adapter's weights in host memory, checked against the layers, ready to copy."""

    digest: str
    ref: str
    tensors: dict[str, torch.Tensor]  # peft keys: `<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r]
    rank: int
    alpha: float
    use_rslora: bool = False
    nbytes: int = 0
    # peft's per-module overrides (module-name pattern -> r / alpha); None: none
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    # DoRA: module -> magnitude / ‖W + s·B·A‖ − 1 # [out] fp32, computed on the loader
    # thread so that activating the adapter into a slot is only copies; None: plain LoRA
    dora_gains: dict[str, torch.Tensor] | None = None
    # the largest rank of any module (a `rank_pattern` may exceed `rank`): the rank bucket
    # whose slots can hold it (runtime/api/slots.py); 0 = read from the lora_A tensors
    max_rank: int = 0

    def __post_init__(self) -> None:
        if not self.nbytes:
            held = [*self.tensors.values(), *(self.dora_gains or {}).values()]
            self.nbytes = sum(t.numel() * t.element_size() for t in held)
        if not self.max_rank:
            keys = {k: peft_format.parse_key(k) for k in self.tensors}
            self.max_rank = max((int(t.shape[0]) for k, t in self.tensors.items()
                                 if keys[k] is not None and keys[k].half == "A"),
                                default=self.rank)


@dataclass
class Load:
    """One registry load on a loader thread; `future` gives its HostAdapter or its error."""

    future: Future
    version: AdapterVersion
    started: float = field(default_factory=time.monotonic)


class LoaderThreads:
    """Registry loads in flight, keyed by digest. Engine thread only, but for `load_fn`,
    the timing callback and `on_done` (loader threads)."""

    def __init__(self, load_fn: Callable[[AdapterVersion], HostAdapter], *, threads: int,
                 nice: int, on_done: Callable[[], None],
                 on_load_time: Callable[[float], None]) -> None:
        self._load_fn = load_fn
        self._on_done = on_done
        self._on_load_time = on_load_time
        self._executor = ThreadPoolExecutor(max_workers=threads,
                                            thread_name_prefix="loraplex-loader",
                                            initializer=_loader_priority,
                                            initargs=(nice,))
        self._loading: dict[str, Load] = {}

    def __contains__(self, digest: str) -> bool:
        return digest in self._loading

    def __len__(self) -> int:
        return len(self._loading)

    def digests(self) -> frozenset[str]:
        return frozenset(self._loading)

    def start(self, version: AdapterVersion) -> None:
        fut = self._executor.submit(self._timed_load, version)
        fut.add_done_callback(lambda _f: self._on_done())
        self._loading[version.digest] = Load(fut, version)

    def finished(self) -> list[Load]:
        """The loads that are done (loaded or failed), no longer counted as in flight."""
        done = [job for job in self._loading.values() if job.future.done()]
        for job in done:
            del self._loading[job.version.digest]
        return done

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _timed_load(self, version: AdapterVersion) -> HostAdapter:
        t0 = time.monotonic()
        host = self._load_fn(version)  # loader thread: registry read + digest + prepare
        self._on_load_time(time.monotonic() - t0)
        return host


@contextmanager
def copy_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    """CUDA only (None: nothing): run a slot write on the pool's copy stream. It first waits
    for the compute stream's queued work (a reused slot may still be read by a step in
    flight), then copies from pinned memory without blocking the host; the compute stream
    waits for the copies before its next kernel, on the GPU, with no host synchronize."""
    if stream is None:
        yield
        return
    compute = torch.cuda.current_stream(stream.device)
    stream.wait_stream(compute)
    with torch.cuda.stream(stream):
        yield
    compute.wait_stream(stream)


def _loader_priority(nice: int) -> None:
    """Optionally let loader threads yield the CPU to the decode loop (Linux: a per-thread
    nice value). Worth it on a CPU-only host with few cores; on a shared, busy host it
    makes cold loads slow, hence off by default (`EngineConfig.loader_nice`)."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not permitted: normal priority
        pass
