"""The Serving page's recorder on its own, with a clock the test moves: per-adapter figures
over the window, percentiles, in-flight counts, cold loads, what a tenant may see, and its
bounds. The live server's engine feeding it is covered by the browser test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from loraplex.runtime.api.observer import EngineObserver, Fanout
from loraplex.runtime.api.types import GenerationRequest, GenerationResult, Timings, Usage
from loraplex.runtime.serve.console import live
from loraplex.runtime.serve.console.live import BUCKET_S, BUCKETS, LiveRecorder, quantile


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _request(rid: str, tenant: str, adapter: str | None) -> GenerationRequest:
    version = None if adapter is None else SimpleNamespace(key=adapter, ref=f"{adapter}:v1")
    return GenerationRequest(rid, tenant, version, [1, 2, 3])


def _done(rid: str, load_s: float = 0.0) -> GenerationResult:
    return GenerationResult(rid, "", [], "length", Usage(3, 4), Timings(adapter_load_s=load_s))


def _serve(rec: LiveRecorder, clock: Clock, rid: str, tenant: str, adapter: str | None, *,
           ttft: float, itl: float, tokens: int, load_s: float = 0.0) -> None:
    rec.on_request_queued(_request(rid, tenant, adapter))
    rec.on_request_progress(rid, "admitted", 0.01)
    rec.on_request_progress(rid, "first_token", ttft)
    for _ in range(tokens - 1):
        rec.on_request_progress(rid, "token", itl)
    rec.on_finished(_done(rid, load_s))


def _row(snap: dict, label: str) -> dict:
    return next(r for r in snap["adapters"] if r["label"] == label)


def test_per_adapter_rates_and_percentiles_over_the_window():
    clock = Clock()
    rec = LiveRecorder(clock)
    for i in range(100):
        _serve(rec, clock, f"a{i}", "acme", "acme/support", ttft=0.05 if i < 98 else 2.0,
               itl=0.01, tokens=10, load_s=0.3 if i == 0 else 0.0)
    _serve(rec, clock, "g", "globex", "globex/sales", ttft=0.2, itl=0.02, tokens=5)
    clock.t += 3 * BUCKET_S  # the traffic's bucket is now complete and recent
    snap = rec.snapshot(lambda tenant: True, everything=True)
    a = _row(snap, "acme/support")
    assert a["requests"] == 100 and a["cold_loads"] == 1 and a["ref"] == "acme/support:v1"
    assert a["tokens_per_s"] == pytest.approx(1000 / (live.RECENT_BUCKETS * BUCKET_S))
    assert 0.04 < a["ttft_p50"] < 0.06 and a["ttft_p99"] > 1.0  # two slow ones of 100
    # every inter-token gap was 10 ms: both percentiles fall in the bin holding 10 ms
    # (bins grow by 1.5x: 8.5-12.8 ms)
    assert 0.0085 < a["itl_p50"] <= a["itl_p99"] <= 0.0129
    assert snap["tokens_per_s"] == pytest.approx(1005 / (live.RECENT_BUCKETS * BUCKET_S))
    assert len(snap["series"]["tokens_per_s"]) == BUCKETS
    assert [r["label"] for r in snap["adapters"]] == ["acme/support", "globex/sales"]


def test_a_tenant_sees_only_its_adapters_and_their_sums():
    clock = Clock()
    rec = LiveRecorder(clock)
    _serve(rec, clock, "a", "acme", "acme/support", ttft=0.1, itl=0.01, tokens=8)
    _serve(rec, clock, "b", "acme", None, ttft=0.1, itl=0.01, tokens=2)
    _serve(rec, clock, "g", "globex", "globex/sales", ttft=0.1, itl=0.01, tokens=50)
    rec.on_request_queued(_request("w", "globex", "globex/sales"))  # globex has one waiting
    rec.on_adapter_load("registry", 0.2)
    clock.t += 3 * BUCKET_S
    snap = rec.snapshot(lambda tenant: tenant == "acme")
    assert [r["label"] for r in snap["adapters"]] == ["acme/support", "acme/(base)"]
    assert "globex" not in str(snap)
    assert snap["waiting"] == 0 and snap["running"] == 0 and snap["cold_loads"] == 0
    assert sum(snap["series"]["tokens_per_s"]) * BUCKET_S == pytest.approx(10)
    assert rec.snapshot(lambda t: True, everything=True)["cold_loads"] == 1


def test_requests_in_flight_are_counted_until_they_end_and_shown_at_each_moment():
    clock = Clock()
    rec = LiveRecorder(clock)
    rec.on_request_queued(_request("r1", "acme", "acme/x"))
    rec.on_request_queued(_request("r2", "acme", "acme/x"))
    row = _row(rec.snapshot(lambda t: True), "acme/x")
    assert (row["running"], row["waiting"]) == (0, 2)
    rec.on_request_progress("r1", "admitted", 0.1)
    clock.t += 10 * BUCKET_S  # a long request: nothing happens for 20 s
    row = _row(rec.snapshot(lambda t: True), "acme/x")
    assert (row["running"], row["waiting"]) == (1, 1)
    assert row["series"]["running"][-1] == 1 and row["series"]["running"][-5] == 1
    rec.on_failed("r2", "CANCELLED")
    rec.on_finished(_done("r1"))
    rec.on_request_progress("r1", "token", 0.1)  # a late event of an ended request: ignored
    row = _row(rec.snapshot(lambda t: True), "acme/x")
    assert (row["running"], row["waiting"], row["requests"]) == (0, 0, 1)
    clock.t += live.WINDOW_S + BUCKET_S  # out of the window: nothing left to show
    assert rec.snapshot(lambda t: True)["adapters"] == []


def test_bounded_adapters_and_requests(monkeypatch):
    monkeypatch.setattr(live, "MAX_ADAPTERS", 4)
    monkeypatch.setattr(live, "MAX_INFLIGHT", 3)
    clock = Clock()
    rec = LiveRecorder(clock)
    rec.on_request_queued(_request("busy", "acme", "acme/busy"))
    for i in range(10):
        _serve(rec, clock, f"r{i}", "acme", f"acme/a{i}", ttft=0.1, itl=0.01, tokens=2)
    labels = {r["label"] for r in rec.snapshot(lambda t: True)["adapters"]}
    assert len(labels) <= 4 and "acme/busy" in labels  # one with a request in flight stays
    for i in range(5):
        rec.on_request_queued(_request(f"q{i}", "acme", "acme/busy"))
    assert len(rec._inflight) == 3


def test_quantiles_of_a_histogram():
    hist = [0] * (len(live.EDGES) + 1)
    assert quantile(hist, 0.5) is None
    hist[10] = 1
    assert live.EDGES[9] <= quantile(hist, 0.5) <= live.EDGES[10]


def test_fanout_gives_every_hook_to_every_observer_and_survives_a_failing_one():
    seen: list[tuple] = []

    class Broken(EngineObserver):
        def on_token(self, s):
            raise RuntimeError("boom")

    class Keeps(EngineObserver):
        def on_token(self, s):
            seen.append(("token", s))

        def on_request_progress(self, rid, event, s):
            seen.append((rid, event, s))

    fan = Fanout(Broken(), Keeps())
    fan.on_token(0.5)
    fan.on_request_progress("r", "token", 0.5)
    fan.on_step(1, 1, 0)  # a hook neither overrides
    assert seen == [("token", 0.5), ("r", "token", 0.5)]
