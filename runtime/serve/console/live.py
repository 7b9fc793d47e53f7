"""Live serving figures per adapter over the last minutes: what the console's Serving page
draws (requests running and waiting, tokens/s, TTFT and inter-token p50/p99, cold loads).

    live = LiveRecorder()
    engine = Engine(config, registry, Fanout(metrics, live))   # server.py wires it
    live.snapshot(identity.can_access)                         # JSON-ready, one tenant's view

Prometheus (`metrics.py`) answers the same questions for the whole server, but its latency
histograms carry no adapter label (the label set stays bounded for scrapers) and a scrape
shows totals, not the last minutes. This recorder keeps, per (tenant, adapter), a ring of
fixed `BUCKET_S` time buckets covering `WINDOW_S`; each bucket counts tokens, finished
requests and cold loads and holds two small latency histograms (`EDGES`, log-spaced), so a
percentile over the window is a merge of at most `BUCKETS` histograms at read time.

Bounds: at most `MAX_ADAPTERS` adapters are tracked (the least recently active one with
nothing in flight makes room), at most `MAX_INFLIGHT` requests, `BUCKETS` buckets each.
Cost on the engine thread: every hook is a dict lookup and a few integer increments under
one uncontended lock (a bisect over `EDGES` for a latency) — O(1), nothing allocated but a
bucket when a new `BUCKET_S` interval begins. Reading (`snapshot`, every ~2 s per open
Serving page) does the merging, on the HTTP thread.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from loraplex.runtime.api.observer import EngineObserver

BUCKET_S = 2.0
WINDOW_S = 300.0
BUCKETS = int(WINDOW_S / BUCKET_S)
MAX_ADAPTERS = 256
MAX_INFLIGHT = 65536
# latency histogram bin upper bounds: 0.5 ms growing by 1.5x to ~5.5 min (last bin: beyond)
EDGES: tuple[float, ...] = tuple(0.0005 * 1.5 ** i for i in range(34))
RECENT_BUCKETS = 5  # "now" figures: the last 10 s of complete buckets


class _Bucket:
    """One `BUCKET_S` interval of one adapter (or of the whole engine)."""

    __slots__ = ("index", "tokens", "finished", "cold", "ttft", "itl", "running", "waiting",
                 "loads")

    def __init__(self, index: int, running: int, waiting: int) -> None:
        self.index = index
        self.tokens = self.finished = self.cold = self.loads = 0
        # in flight at the interval's end (so far, for the current one): summed over
        # adapters these are the totals at one instant, as a gauge scraped then would be
        self.running, self.waiting = running, waiting
        self.ttft: list[int] | None = None  # counts per EDGES bin (+1 overflow)
        self.itl: list[int] | None = None


class _Track:
    """The ring of buckets of one (tenant, adapter) and what it has in flight now."""

    __slots__ = ("tenant", "adapter", "ref", "buckets", "running", "waiting")

    def __init__(self, tenant: str, adapter: str) -> None:
        self.tenant, self.adapter, self.ref = tenant, adapter, ""
        self.buckets: deque[_Bucket] = deque(maxlen=BUCKETS)
        self.running = self.waiting = 0

    def bucket(self, index: int) -> _Bucket:
        if not self.buckets or self.buckets[-1].index != index:
            self.buckets.append(_Bucket(index, self.running, self.waiting))
        return self.buckets[-1]

    def mark(self, index: int) -> None:
        """Record the in-flight counts just changed (every change goes through here)."""
        b = self.bucket(index)
        b.running, b.waiting = self.running, self.waiting


def _observe(hist: list[int] | None, seconds: float) -> list[int]:
    hist = hist or [0] * (len(EDGES) + 1)
    hist[bisect_left(EDGES, seconds)] += 1
    return hist


def quantile(hist: list[int], q: float) -> float | None:
    """The `q` quantile of a merged histogram, interpolated inside its bin (None: empty)."""
    total = sum(hist)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = EDGES[i - 1] if i > 0 else 0.0
            hi = EDGES[i] if i < len(EDGES) else EDGES[-1]
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return EDGES[-1]


class LiveRecorder(EngineObserver):
    """See the module docstring. Hooks run on the engine, loader and caller threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tracks: OrderedDict[tuple[str, str], _Track] = OrderedDict()
        self._inflight: dict[str, list[Any]] = {}  # request id -> [track, "waiting"|"running"]
        self._engine = _Track("", "")  # the whole engine: occupancy and loads

    def _index(self) -> int:
        return int(self._clock() // BUCKET_S)

    # -- hooks ----------------------------------------------------------------------------
    def on_request_queued(self, request: Any) -> None:
        adapter = request.adapter
        key = (request.tenant, adapter.key if adapter is not None else "")
        with self._lock:
            track = self._tracks.get(key)
            if track is None:
                track = self._tracks[key] = _Track(*key)
                self._make_room()
            self._tracks.move_to_end(key)
            track.ref = adapter.ref if adapter is not None else ""
            if len(self._inflight) >= MAX_INFLIGHT:
                self._end(self._inflight.pop(next(iter(self._inflight))))
            self._inflight[request.request_id] = [track, "waiting"]
            track.waiting += 1
            track.mark(self._index())

    def on_request_progress(self, request_id: str, event: str, seconds: float) -> None:
        with self._lock:
            item = self._inflight.get(request_id)
            if item is None:
                return
            track, index = item[0], self._index()
            if event == "admitted":
                item[1] = "running"
                track.waiting -= 1
                track.running += 1
                track.mark(index)
                return
            b = track.bucket(index)
            b.tokens += 1
            self._engine.bucket(index).tokens += 1
            if event == "first_token":
                b.ttft = _observe(b.ttft, seconds)
            else:
                b.itl = _observe(b.itl, seconds)

    def on_finished(self, result: Any) -> None:
        with self._lock:
            item = self._inflight.pop(result.request_id, None)
            if item is None:
                return
            self._end(item)
            b = item[0].bucket(self._index())
            b.finished += 1
            if result.timings.adapter_load_s > 0:
                b.cold += 1

    def on_failed(self, request_id: str, code: str) -> None:
        with self._lock:
            item = self._inflight.pop(request_id, None)
            if item is not None:
                self._end(item)

    def on_occupancy(self, running: int, waiting: int) -> None:
        with self._lock:
            self._engine.running, self._engine.waiting = running, waiting
            self._engine.mark(self._index())

    def on_step(self, batch_size: int, running: int, waiting: int) -> None:
        self.on_occupancy(running, waiting)

    def on_adapter_load(self, tier: str, seconds: float) -> None:
        if tier == "registry":
            with self._lock:
                self._engine.bucket(self._index()).loads += 1

    def _end(self, item: list[Any]) -> None:
        track, state = item
        if state == "running":
            track.running -= 1
        else:
            track.waiting -= 1
        track.mark(self._index())

    def _make_room(self) -> None:
        """Forget the least recently active adapter with nothing in flight (or, when all
        are busy, the least recently active one) once more than MAX_ADAPTERS are tracked."""
        if len(self._tracks) <= MAX_ADAPTERS:
            return
        for key, track in self._tracks.items():
            if track.running == 0 and track.waiting == 0:
                del self._tracks[key]
                return
        self._tracks.popitem(last=False)

    # -- reading --------------------------------------------------------------------------
    def snapshot(self, visible: Callable[[str], bool], *, everything: bool = False
                 ) -> dict[str, Any]:
        """The figures of the adapters of the tenants `visible` accepts. `everything`
        (an admin): the totals are the engine's own, cold loads included; otherwise they
        are the sums over the visible adapters, so a tenant learns nothing of the others."""
        now = self._index()
        first = now - BUCKETS + 1
        with self._lock:
            tracks = [t for t in self._tracks.values() if visible(t.tenant)]
            rows = [_row(t, first, now) for t in tracks]
            engine = _series(self._engine, first, now) if everything else None
        rows = [r for r in rows if r["active"]]
        rows.sort(key=lambda r: (-r["tokens_per_s"], -r["requests"], r["label"]))
        if engine is None:
            engine = {k: [sum(r["series"][k][i] for r in rows) for i in range(BUCKETS)]
                      for k in ("running", "waiting")}
            engine["tokens"] = [round(sum(r["series"]["tokens_per_s"][i] for r in rows)
                                      * BUCKET_S) for i in range(BUCKETS)]
            engine["loads"] = [sum(r["series"]["cold"][i] for r in rows) for i in range(BUCKETS)]
            running = sum(r["running"] for r in rows)
            waiting = sum(r["waiting"] for r in rows)
        else:
            running, waiting = self._engine.running, self._engine.waiting
        return {"bucket_s": BUCKET_S, "window_s": WINDOW_S, "running": running,
                "waiting": waiting, "tokens_per_s": _recent_rate(engine["tokens"]),
                "cold_loads": sum(engine["loads"]), "series": {
                    "tokens_per_s": [n / BUCKET_S for n in engine["tokens"]],
                    "running": engine["running"], "waiting": engine["waiting"]},
                "adapters": rows}


def _series(track: _Track, first: int, now: int) -> dict[str, list[int]]:
    """Per-bucket counts of `track` from bucket `first` to `now` (zeros where idle), and
    the requests in flight at the end of each."""
    out = {k: [0] * BUCKETS for k in ("tokens", "running", "waiting", "loads", "cold",
                                      "finished")}
    # in-flight counts change only inside a bucket, so an idle interval holds what the
    # bucket before it ended with (before the first one: nothing was in flight)
    at = {b.index - first: b for b in track.buckets if b.index >= first}
    state = (0, 0)
    for b in track.buckets:
        if b.index < first:
            state = (b.running, b.waiting)
    for i in range(BUCKETS):
        b = at.get(i)
        if b is not None:
            out["tokens"][i], out["loads"][i] = b.tokens, b.loads
            out["cold"][i], out["finished"][i] = b.cold, b.finished
            state = (b.running, b.waiting)
        out["running"][i], out["waiting"][i] = state
    return out


def _recent_rate(tokens: list[int]) -> float:
    """Tokens/s over the last RECENT_BUCKETS complete buckets (the current one is partial)."""
    window = tokens[-RECENT_BUCKETS - 1:-1]
    return sum(window) / (len(window) * BUCKET_S) if window else 0.0


def _row(track: _Track, first: int, now: int) -> dict[str, Any]:
    series = _series(track, first, now)
    ttft = [0] * (len(EDGES) + 1)
    itl = [0] * (len(EDGES) + 1)
    for b in track.buckets:
        if b.index >= first:
            for hist, part in ((ttft, b.ttft), (itl, b.itl)):
                if part is not None:
                    for i, n in enumerate(part):
                        hist[i] += n
    requests = sum(series["finished"])
    label = f"{track.tenant}/(base)" if not track.adapter else track.adapter
    return {"tenant": track.tenant, "adapter": track.adapter, "label": label,
            "ref": track.ref, "running": track.running, "waiting": track.waiting,
            "tokens_per_s": _recent_rate(series["tokens"]), "requests": requests,
            "cold_loads": sum(series["cold"]),
            "ttft_p50": quantile(ttft, 0.5), "ttft_p99": quantile(ttft, 0.99),
            "itl_p50": quantile(itl, 0.5), "itl_p99": quantile(itl, 0.99),
            "active": bool(track.running or track.waiting or any(series["tokens"])
                           or requests),
            "series": {"tokens_per_s": [n / BUCKET_S for n in series["tokens"]],
                       "running": series["running"], "waiting": series["waiting"],
                       "cold": series["cold"]}}
