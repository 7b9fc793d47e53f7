"""A storm: many concurrent submits and cancels from several threads while some adapters
fail to load (registry read raises) and others fail to activate (the host → slot copy
raises). Nothing may deadlock and no request may be lost: every stream ends with a result
or a typed error, and afterwards every KV row and adapter slot is free again."""

from __future__ import annotations

import random
import threading

from loraplex.errors import DataCorruption, LoraplexError
from loraplex.registry import Identity
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import SPECS, make_world

ACME = Identity("acme")
THREADS, PER_THREAD = 4, 8


def test_storm_of_submits_cancels_and_activation_failures(micro_base, tmp_path):
    world = make_world(micro_base, tmp_path, specs=SPECS[:4])
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=2, max_rank=16, max_batch=4, max_waiting=256),
                    world.registry).start()
    digests = {n: world.registry.resolve(ACME, f"acme/{n}").digest for n in world.names}
    no_load, no_activate = digests[world.names[2]], digests[world.names[3]]

    def failing_load(version):
        if version.digest == no_load:
            raise DataCorruption("blob unreadable (storm test)", field="adapter")

    pool = engine._core.pool
    real_write = pool._write_slot

    def failing_write(slot, host):
        if host.digest == no_activate:
            raise RuntimeError("device copy failed (storm test)")
        real_write(slot, host)

    engine.loader.hook = failing_load
    pool._write_slot = failing_write  # the pool's own copy hook: activation raises
    streams: dict[str, object] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(t: int) -> None:
        rng = random.Random(t)
        try:
            for i in range(PER_THREAD):
                rid = f"t{t}-{i}"
                name = rng.choice([*world.names, None])
                s = engine.submit(engine.admit(
                    rid, ACME, f"acme/{name}" if name else None,
                    prompt_ids=[rng.randrange(3, 250) for _ in range(rng.randint(2, 8))],
                    sampling=SamplingParams(max_new_tokens=rng.randint(1, 4))))
                with lock:
                    streams[rid] = s
                if i % 4 == 0:  # cancel it at once (still queued, most likely)
                    engine.cancel(rid)
                elif rng.random() < 0.3:  # cancel someone's request, maybe another thread's
                    with lock:
                        victim = rng.choice(list(streams))
                    engine.cancel(victim)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    try:
        threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a submitting thread hung"
        assert errors == []
        outcomes = {}
        for rid, s in streams.items():
            try:
                outcomes[rid] = s.wait(60).finish_reason  # TimeoutError here = a lost request
            except LoraplexError as e:
                outcomes[rid] = type(e).__name__
        stats = engine.stats()
        resident = engine.resident()
        after = engine.generate(engine.admit("after", ACME, f"acme/{world.names[0]}",
                                             prompt_ids=[5, 6],
                                             sampling=SamplingParams(max_new_tokens=2)), 30)
    finally:
        engine.shutdown()
    assert len(outcomes) == THREADS * PER_THREAD
    kinds = set(outcomes.values())
    assert "DataCorruption" in kinds and "LoraplexError" in kinds, kinds  # both failures hit
    assert kinds & {"length", "stop"} and "cancelled" in kinds, kinds
    assert kinds <= {"length", "stop", "cancelled", "DataCorruption", "LoraplexError"}, kinds
    assert (stats.running, stats.waiting, stats.kv_rows_used) == (0, 0, 0)
    assert all(r.active_sequences == 0 for r in resident)
    assert after.finish_reason == "length"
