"""Give freed memory back to the operating system, so a server's resident size follows
what it holds rather than the largest burst it ever received.

Why: glibc's malloc keeps freed memory for reuse. Requests that arrive as megabytes (a
4 MiB prompt refused by its size, 1 MiB upload chunks, a merge's tensors) are allocated
from the heap once glibc's mmap threshold has grown past their size (it grows every time a
large mmapped block is freed), and the heap's freed pages stay resident: a storm of
refused 4 MiB prompts raised a server's RSS from 560 MiB to over 1 GiB, while
`malloc_trim(0)` brought it back to 565 MiB. Fixing the mmap threshold instead would make
every large tensor of every decode step an mmap/munmap pair with fresh page faults, so the
server trims rather than changes how inference allocates.

`MemoryTrimmer` is one daemon thread: every `interval_s` it reads the process's RSS and,
when it grew by more than `slack_bytes` since the last trim, calls `malloc_trim(0)`
(through ctypes, which releases the GIL for the call); `request()` asks for a trim at
once, after work known to free a lot (an upload, a merge); trims come at most once a
second however often they are asked for (each one walks every arena under its lock). `limit_arenas(n)` caps glibc's
malloc arenas (one per thread by default, up to 8 per core), each of which keeps its own
freed memory. Neither does anything where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
SLACK_BYTES = 32 << 20
MIN_GAP_S = 1.0  # trims come at most this often, however many requests arrive


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def limit_arenas(n: int | None) -> bool:
    """Cap glibc's malloc arenas at `n` (None or 0: leave glibc's default). Call before the
    server starts its threads; True when applied."""
    libc = _glibc()
    if not n or libc is None:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, int(n)))


def trim() -> int:
    """`malloc_trim(0)` now; the bytes of RSS it gave back (0 off glibc)."""
    libc = _glibc()
    if libc is None:
        return 0
    before = rss_bytes()
    libc.malloc_trim(0)
    return max(0, before - rss_bytes())


class MemoryTrimmer:
    """A daemon thread that trims when RSS grew by `slack_bytes` since the last trim
    (checked every `interval_s`), or at once on `request()`."""

    def __init__(self, interval_s: float, slack_bytes: int = SLACK_BYTES) -> None:
        self.interval_s = interval_s
        self.slack_bytes = slack_bytes
        self.trims = 0
        self.freed_bytes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = rss_bytes()

    def start(self) -> MemoryTrimmer:
        if self.interval_s > 0 and _glibc() is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loraplex-trim",
                                            daemon=True)
            self._thread.start()
        return self

    def request(self) -> None:
        """Trim soon (after work that freed large buffers); cheap, never blocks."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            rss = rss_bytes()
            self._baseline = min(self._baseline, rss)
            if asked or rss > self._baseline + self.slack_bytes:
                freed = trim()
                self.trims += 1
                self.freed_bytes += freed
                self._baseline = rss_bytes()
                if freed >= self.slack_bytes:
                    log.debug("malloc_trim gave back %d MiB", freed >> 20)
                self._stop.wait(MIN_GAP_S)
