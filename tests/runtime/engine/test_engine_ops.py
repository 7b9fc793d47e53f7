"""Engine behaviour under load: eviction, pinning, hot swap, cancellation, deadlines,
fairness, cold loads off the decode loop, back-pressure and every bad-input error."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loraplex import compute
from loraplex.basemodel import EOS_ID, build_base
from loraplex.errors import (
    AlreadyExists,
    DataCorruption,
    FailedPrecondition,
    IncompatibleAdapter,
    InvalidArgument,
    NotFound,
    Overloaded,
    ResourceExhausted,
    Unavailable,
)
from loraplex.registry import Identity
from loraplex.runtime.api.observer import EngineObserver
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import SPECS, make_world, reference_greedy

ACME = Identity("acme")
BETA = Identity("beta")


@pytest.fixture(scope="module")
def world(base_factory, tmp_path_factory):
    return make_world(base_factory("micro", "llama"), tmp_path_factory.mktemp("ops"))


class Recorder(EngineObserver):
    """Records events; `token_sleep` slows every token (a slow model, deterministically)."""

    def __init__(self, token_sleep: float = 0.0) -> None:
        self.events: list[tuple] = []
        self.finished: list[str] = []
        self.token_sleep = token_sleep
        self.lock = threading.Lock()

    def on_cache(self, event, tier):
        with self.lock:
            self.events.append(("cache", event, tier))

    def on_adapter_load(self, tier, seconds):
        with self.lock:
            self.events.append(("load", tier, seconds))

    def on_token(self, inter_token_s):
        if self.token_sleep:
            time.sleep(self.token_sleep)

    def on_finished(self, result):
        with self.lock:
            self.finished.append(result.request_id)


def _engine(world, observer=None, **kw) -> Engine:
    cfg = dict(base_dir=world.base_dir, quantization="none", device="cpu", max_slots=4,
               max_rank=16, max_batch=8)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg), world.registry, observer).start()


def _req(engine, rid, adapter=None, prompt=(65, 66, 67), n=8, identity=ACME, **kw):
    sampling = kw.pop("sampling", None) or SamplingParams(max_new_tokens=n)
    return engine.admit(rid, identity, adapter, prompt_ids=list(prompt), sampling=sampling,
                        **kw)


def test_eviction_under_pressure_keeps_every_answer_right(world):
    rec = Recorder()
    engine = _engine(world, rec, max_slots=2, max_batch=4, host_cache_bytes=200_000)
    g = torch.Generator().manual_seed(5)
    reqs = [(f"e{i}", world.names[i % 6], torch.randint(0, 256, (6,), generator=g).tolist())
            for i in range(12)]
    try:
        streams = [engine.submit(_req(engine, rid, f"acme/{a}", p, n=5)) for rid, a, p in reqs]
        results = [s.wait(60) for s in streams]
        stats = engine.stats()
    finally:
        engine.shutdown()
    for (_, a, p), r in zip(reqs, results, strict=True):
        assert r.token_ids == reference_greedy(world, a, p, 5, eos=EOS_ID)
    evictions = [e for e in rec.events if e[:2] == ("cache", "evict")]
    assert any(e[2] == "device" for e in evictions) and any(e[2] == "host" for e in evictions)
    assert stats.slots_used <= 2 and 0 < stats.host_peak_bytes <= 200_000
    # "auto" (the default): the dtype loraplex.compute picks here, and why, in the stats
    want = compute.choose("auto", "cpu", quantization="none")
    assert (stats.compute_dtype, stats.compute_reason) == (want.dtype, want.reason)


def test_pinned_adapter_stays_in_its_slot_and_unpin_lets_it_go(world):
    engine = _engine(world, max_slots=3, max_batch=2)
    try:
        assert engine.pin(ACME, "acme/a1") is True
        assert engine.pin(ACME, "acme/a1") is False  # safe to repeat
        assert engine.pin(ACME, "acme/a2") is True
        with pytest.raises(ResourceExhausted):
            engine.pin(ACME, "acme/a3")  # would pin the last slot away
        assert engine.unpin(ACME, "acme/a2") is True
        for i, name in enumerate(world.names[1:7]):
            engine.generate(_req(engine, f"p{i}", f"acme/{name}", n=2))
        pinned = {r.digest: r for r in engine.resident() if r.slot is not None}
        digest = world.registry.resolve(ACME, "acme/a1").digest
        assert digest in pinned and pinned[digest].pinned
        assert engine.unpin(ACME, "acme/a1") is True
        assert engine.unpin(ACME, "acme/a1") is False
        for i, name in enumerate(world.names[1:5]):
            engine.generate(_req(engine, f"q{i}", f"acme/{name}", n=2))
        assert digest not in {r.digest for r in engine.resident() if r.slot is not None}
    finally:
        engine.shutdown()


def test_prefetch_unload_and_resident(world):
    engine = _engine(world, max_slots=2)
    try:
        assert engine.prefetch(ACME, "acme/a3") is True
        assert engine.prefetch(ACME, "acme/a3") is False
        digest = world.registry.resolve(ACME, "acme/a3").digest
        [r] = [r for r in engine.resident() if r.digest == digest]
        assert r.slot is not None and r.on_host and r.ref == "acme/a3:v1"
        assert engine.unload(ACME, "acme/a3") is True
        assert engine.unload(ACME, "acme/a3") is False
        assert digest not in {r.digest for r in engine.resident()}
    finally:
        engine.shutdown()


def test_host_tier_never_passes_its_byte_bound_under_concurrent_cold_loads(world):
    """Every adapter wanted at once, through a host tier that holds two of the largest:
    loads wait for room instead of passing the bound (the pool's own peak of held +
    in-flight bytes), none runs on the engine thread, every answer is right, and the
    stats and the resident view report each tier's bytes."""
    versions = {n: world.registry.resolve(ACME, f"acme/{n}") for n in world.names}
    bound = 2 * max(v.size_bytes for v in versions.values())  # fp32 stored, fp32 on host
    rec = Recorder()
    engine = _engine(world, rec, max_slots=2, max_batch=6, loader_threads=4,
                     host_cache_bytes=bound, compute_dtype="float32")
    load_threads: set[str] = set()
    engine.loader.hook = lambda v: load_threads.add(threading.current_thread().name)
    g = torch.Generator().manual_seed(9)
    reqs = [(f"b{i}", world.names[i % len(world.names)],
             torch.randint(0, 256, (5,), generator=g).tolist()) for i in range(len(versions))]
    try:
        streams = [engine.submit(_req(engine, rid, f"acme/{a}", p, n=4)) for rid, a, p in reqs]
        results = [s.wait(120) for s in streams]
        stats, resident = engine.stats(), engine.resident()
        listed = engine.resident(limit=1)
    finally:
        engine.shutdown()
    for (_, a, p), r in zip(reqs, results, strict=True):
        assert r.token_ids == reference_greedy(world, a, p, 4, eos=EOS_ID)
    assert stats.host_limit_bytes == bound
    assert max(v.size_bytes for v in versions.values()) <= stats.host_peak_bytes <= bound
    assert ("cache", "evict", "host") in rec.events  # the bound made room, more than once
    assert load_threads and all(t.startswith("loraplex-loader") for t in load_threads)
    assert stats.host_bytes == sum(r.size_bytes for r in resident if r.on_host)
    assert stats.device_bytes == sum(r.size_bytes for r in resident if r.slot is not None)
    assert stats.host_adapters == sum(r.on_host for r in resident)
    assert stats.host_loading_bytes == 0 and stats.loads_queued == 0
    assert len(listed) == 1 and listed[0].slot is not None  # device slots come first


def test_an_adapter_bigger_than_the_host_tier_fails_with_a_clear_error(world):
    engine = _engine(world, host_cache_bytes=50_000)
    try:
        with pytest.raises(FailedPrecondition) as e:  # acme/a5 holds ~143 KB
            engine.generate(_req(engine, "big", "acme/a5", n=2), timeout=30)
        assert e.value.field == "adapter" and "host_cache_bytes" in e.value.message
        with pytest.raises(FailedPrecondition):
            engine.prefetch(ACME, "acme/a5")
        assert engine.generate(_req(engine, "small", "acme/a3", n=2), timeout=30).token_ids
    finally:
        engine.shutdown()


def test_hot_swap_new_requests_see_the_alias_move_running_ones_finish_on_theirs(world):
    reg, admin = world.registry, Identity.system()
    v1 = reg.push(admin, world.dirs["a1"], "acme/chat", base=world.base_dir)
    reg.set_alias(admin, "acme/chat:v1", "prod", expected=None)
    engine = _engine(world, Recorder(token_sleep=0.01))
    prompt = [70, 71, 72, 73]
    try:
        old = engine.submit(_req(engine, "old", "acme/chat@prod", prompt, n=120))
        it = iter(old)
        next(it)
        v2 = reg.push(admin, world.dirs["a2"], "acme/chat", base=world.base_dir)
        reg.set_alias(admin, "acme/chat:v2", "prod", expected=1)
        new = engine.generate(_req(engine, "new", "acme/chat@prod", prompt, n=6))
        assert not old.done  # the alias moved mid-stream
        old_result = old.wait(60)
    finally:
        engine.shutdown()
    assert (v1.version, v2.version) == (1, 2)
    assert old_result.adapter.version == 1 and new.adapter.version == 2
    assert old_result.token_ids == reference_greedy(world, "a1", prompt, 120, eos=EOS_ID)
    assert new.token_ids == reference_greedy(world, "a2", prompt, 6, eos=EOS_ID)


def test_cancel_frees_the_row_for_the_next_request(world):
    engine = _engine(world, Recorder(token_sleep=0.005), max_batch=1)
    try:
        long = engine.submit(_req(engine, "long", "acme/a1", n=200))
        next(iter(long))
        queued = engine.submit(_req(engine, "queued", "acme/a2", n=4))
        waiting = engine.submit(_req(engine, "waiting", None, n=4))
        assert engine.cancel("waiting") is True  # cancelled while still queued
        assert engine.cancel("waiting") is False
        assert engine.cancel("nope") is False
        assert engine.stats().kv_rows_used == 1
        assert long.cancel() is True
        r_long, r_queued, r_waiting = long.wait(10), queued.wait(10), waiting.wait(10)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert r_long.finish_reason == "cancelled" and 0 < len(r_long.token_ids) < 200
    assert r_waiting.finish_reason == "cancelled" and r_waiting.token_ids == []
    assert r_queued.finish_reason in ("length", "stop")
    assert stats.kv_rows_used == 0 and stats.running == 0 and stats.waiting == 0


def test_deadlines_end_running_and_waiting_requests(world):
    engine = _engine(world, Recorder(token_sleep=0.01), max_batch=1)
    try:
        running = engine.submit(_req(engine, "run", None, n=200, deadline=time.monotonic() + 0.3))
        waiting = engine.submit(_req(engine, "wait", None, n=5, deadline=time.monotonic() + 0.1))
        past = engine.submit(_req(engine, "past", None, n=5, deadline=time.monotonic() - 1))
        r_run, r_wait, r_past = running.wait(10), waiting.wait(10), past.wait(10)
        after = engine.generate(_req(engine, "after", None, n=3))
    finally:
        engine.shutdown()
    assert r_run.finish_reason == "deadline" and 0 < len(r_run.token_ids) < 200
    assert r_wait.finish_reason == "deadline" and r_wait.token_ids == []
    assert r_past.finish_reason == "deadline"
    assert after.finish_reason == "length"


def test_one_tenants_burst_does_not_starve_another(world):
    rec = Recorder(token_sleep=0.002)
    engine = _engine(world, rec, max_batch=2)
    try:
        burst = [engine.submit(_req(engine, f"acme{i}", None, n=6)) for i in range(12)]
        time.sleep(0.05)
        other = [engine.submit(_req(engine, f"beta{i}", None, n=6, identity=BETA)) for i in range(2)]
        for s in burst + other:
            s.wait(60)
    finally:
        engine.shutdown()
    order = rec.finished
    assert max(order.index("beta0"), order.index("beta1")) <= 6, order  # FIFO would be 13


def test_cold_load_does_not_stall_running_sequences(world):
    """A registry read that takes 1.5 s (a real delay in the loader path) happens while a
    running request keeps getting tokens at its usual pace; the cold request then runs."""
    engine = _engine(world, Recorder(token_sleep=0.01), max_batch=4)
    slow = world.registry.resolve(ACME, "acme/a9").digest

    def slow_registry(version):
        if version.digest == slow:
            time.sleep(1.5)

    engine.loader.hook = slow_registry
    try:
        running = engine.submit(_req(engine, "running", "acme/a1", n=120))
        it = iter(running)
        next(it)
        cold = engine.submit(_req(engine, "cold", "acme/a9", [80, 81], n=4))
        stamps = [time.monotonic()]
        for _ in it:
            stamps.append(time.monotonic())
            if cold.done:
                break
        cold_result = cold.wait(30)
        running.cancel()
    finally:
        engine.shutdown()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert cold_result.timings.adapter_load_s >= 1.4
    assert len(gaps) >= 10 and max(gaps) < 0.5  # never waited for the 1.5 s load
    assert cold_result.token_ids == reference_greedy(world, "a9", [80, 81], 4, eos=EOS_ID)


def test_full_queue_is_overloaded_and_draining_is_unavailable(world):
    engine = _engine(world, Recorder(token_sleep=0.005), max_batch=1, max_waiting=2,
                     tenant_waiting_share=1.0)  # one tenant may fill the queue here
    try:
        first = engine.submit(_req(engine, "1", None, n=100))
        next(iter(first))
        engine.submit(_req(engine, "2", None, n=2))
        engine.submit(_req(engine, "3", None, n=2))
        with pytest.raises(Overloaded):
            engine.submit(_req(engine, "4", None, n=2))
        first.cancel()
        assert engine.drain(timeout=30) is True
        with pytest.raises(Unavailable):
            engine.submit(_req(engine, "5", None, n=2))
    finally:
        engine.shutdown()


def test_per_tenant_limits_refuse_one_tenants_burst_but_not_another_tenant(world):
    """One tenant at its per-tenant limit (requests, or tokens = prompt + max_new_tokens)
    gets RESOURCE_EXHAUSTED; another tenant's request is still queued and served."""
    engine = _engine(world, Recorder(token_sleep=0.1), max_batch=1, max_waiting=50,
                     max_waiting_per_tenant=2, max_waiting_tokens_per_tenant=40)
    try:
        first = engine.submit(_req(engine, "1", None, n=30))  # 33 tokens: within the cap alone
        next(iter(first))  # running: no longer waiting
        engine.submit(_req(engine, "2", None, n=5))  # 3 + 5 = 8 waiting tokens
        with pytest.raises(ResourceExhausted, match="too many tokens"):
            engine.submit(_req(engine, "big", None, n=35))  # 8 + 38 > 40
        engine.submit(_req(engine, "3", None, n=5))
        with pytest.raises(ResourceExhausted, match="2 requests waiting") as err:
            engine.submit(_req(engine, "4", None, n=2))
        assert not isinstance(err.value, Overloaded)  # a tenant limit, not a full queue
        other = engine.submit(_req(engine, "b1", None, n=2, identity=BETA))
        first.cancel()
        assert other.wait(60).finish_reason == "length"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("change, exc, field", [
    (dict(adapter="acme/nope"), NotFound, None),
    (dict(adapter="beta/a1"), NotFound, None),
    (dict(prompt_ids=[]), InvalidArgument, "prompt_ids"),
    (dict(prompt_ids=[1] * 300), InvalidArgument, "prompt_ids"),
    (dict(prompt_ids=[10_000]), InvalidArgument, "prompt_ids"),
    (dict(sampling=SamplingParams(max_new_tokens=0)), InvalidArgument, "sampling.max_new_tokens"),
    (dict(sampling=SamplingParams(max_new_tokens=10_000)), InvalidArgument,
     "sampling.max_new_tokens"),
    (dict(sampling=SamplingParams(temperature=-1.0)), InvalidArgument, "sampling.temperature"),
    (dict(sampling=SamplingParams(top_p=0.0)), InvalidArgument, "sampling.top_p"),
    (dict(sampling=SamplingParams(top_k=-2)), InvalidArgument, "sampling.top_k"),
    (dict(sampling=SamplingParams(stop=("",))), InvalidArgument, "sampling.stop"),
])
def test_bad_input_is_a_typed_error_and_the_engine_keeps_serving(world, change, exc, field,
                                                                 engine_for_errors):
    fields = dict(request_id="bad", identity=ACME, adapter="acme/a1", prompt_ids=[65, 66],
                  sampling=SamplingParams(max_new_tokens=2))
    fields.update(change)
    with pytest.raises(exc) as e:
        engine_for_errors.submit(engine_for_errors.admit(**fields))
    if field:
        assert e.value.field == field
    assert engine_for_errors.generate(_req(engine_for_errors, "ok", "acme/a1", n=2)).finish_reason == "length"


@pytest.fixture(scope="module")
def engine_for_errors(world):
    engine = _engine(world, max_new_tokens_limit=64)
    yield engine
    engine.shutdown()


def test_prompt_text_errors_and_duplicate_ids(engine_for_errors):
    with pytest.raises(InvalidArgument) as e:
        engine_for_errors.submit(engine_for_errors.admit("t", ACME, None, prompt=""))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidArgument) as e:
        engine_for_errors.submit(engine_for_errors.admit("t", ACME, None, prompt="x", prompt_ids=[1]))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidArgument) as e:
        engine_for_errors.submit(engine_for_errors.admit("t", ACME, None, prompt="x" * 400))
    assert e.value.field == "prompt"
    s = engine_for_errors.submit(_req(engine_for_errors, "dup", None, n=30))
    with pytest.raises(AlreadyExists):
        engine_for_errors.submit(_req(engine_for_errors, "dup", None, n=2))
    s.wait(30)


def test_incompatible_adapter_is_refused(world, tmp_path):
    other_base = build_base(tmp_path / "other", size="micro", arch="llama", seed=1)
    other = make_world(other_base, tmp_path / "w", specs=SPECS[:1], tenant="acme")
    v = other.registry.resolve(ACME, "acme/a1")
    # the same registry as the engine's: push the foreign-base adapter there
    world.registry.register_base(Identity.system(), other_base)
    foreign = world.registry.push(ACME, other.dirs["a1"], "acme/foreign", base=other_base)
    assert foreign.base.digest == v.base.digest
    engine = _engine(world)
    try:
        with pytest.raises(IncompatibleAdapter):
            engine.submit(_req(engine, "x", "acme/foreign"))
        assert engine.generate(_req(engine, "ok", "acme/a2", n=2)).finish_reason == "length"
    finally:
        engine.shutdown()


def test_corrupt_blob_fails_only_its_request(base_factory, tmp_path):
    w = make_world(base_factory("micro", "llama"), tmp_path, specs=SPECS[:2])
    version = w.registry.resolve(ACME, "acme/a2")
    path = w.registry.blobs.path(version.weights_blob)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    engine = _engine(w, Recorder(token_sleep=0.005))
    try:
        good = engine.submit(_req(engine, "good", "acme/a1", n=30))
        bad = engine.submit(_req(engine, "bad", "acme/a2", n=5))
        with pytest.raises(DataCorruption):
            bad.wait(30)
        with pytest.raises(DataCorruption):
            list(bad)
        assert good.wait(30).finish_reason == "length"
        assert engine.generate(_req(engine, "after", None, n=2)).finish_reason == "length"
    finally:
        engine.shutdown()


class Counting(EngineObserver):
    """Counts every hook; raises from on_token to show a metrics bug cannot hurt serving."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name):
        if name.startswith("on_"):
            calls = object.__getattribute__(self, "calls")

            def hook(*args):
                calls[name] = calls.get(name, 0) + 1
                if name == "on_token":
                    raise RuntimeError("metrics bug")

            return hook
        return object.__getattribute__(self, name)


def test_observer_sees_the_request_lifecycle_and_its_errors_are_contained(world):
    obs = Counting()
    engine = _engine(world, obs)
    try:
        r = engine.generate(_req(engine, "o1", "acme/a1", n=5))
        with pytest.raises(NotFound):
            engine.submit(_req(engine, "o2", "acme/missing"))
    finally:
        engine.shutdown()
    c = obs.calls
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    assert c["on_request_queued"] == 1 and c["on_request_rejected"] == 1
    assert c["on_admitted"] == 1 and c["on_first_token"] == 1 and c["on_token"] == 4
    assert c["on_finished"] == 1 and c["on_step"] >= 5
    assert c["on_adapter_load"] >= 2  # registry → host, host → slot
    assert c["on_cache"] >= 1
