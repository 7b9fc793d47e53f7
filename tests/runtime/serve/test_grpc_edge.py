"""The serving edge over a real channel: intake off the event loop, BatchGenerate items
past their deadline, and gauges that follow cancels on an otherwise idle server."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from loraplex.client import Client, generate_request
from loraplex.errors import DeadlineExceeded
from loraplex.registry import Identity, Registry
from loraplex.runtime.engine.intake import LockedTokenizer
from loraplex.runtime.serve.metrics import scrape
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.v1 import inference_pb2_grpc
from tests.runtime.serve.test_grpc_inference import LONG, make_peft_adapter, settings_for, wait_idle


@pytest.fixture(scope="module")
def edge(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-edge")
    reg = Registry.open(root / "reg")
    system = Identity.system()
    with BackgroundServer(settings_for(micro_base, root), registry=reg) as bg:
        acme = Client(bg.target, token=reg.create_token(system, "acme"), timeout=60)
        admin = Client(bg.target, token=reg.create_token(system, "ops", admin=True), timeout=60)
        acme.register_adapter("acme/support", make_peft_adapter(micro_base, root / "a"))
        acme.set_alias("acme/support:v1", "prod")
        yield {"bg": bg, "reg": reg, "acme": acme, "admin": admin,
               "engine": bg.server.engine}
        acme.close()
        admin.close()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_registry_and_tokenizer_never_run_on_the_event_loop(edge, monkeypatch):
    reg, acme, admin = edge["reg"], edge["acme"], edge["admin"]
    calls: list[tuple[str, str, bool]] = []
    real_resolve, real_encode = reg.resolve, LockedTokenizer.encode_ids

    def resolve(identity, ref):
        calls.append(("resolve", threading.current_thread().name, _on_event_loop()))
        return real_resolve(identity, ref)

    def encode_ids(self, text):
        calls.append(("encode", threading.current_thread().name, _on_event_loop()))
        return real_encode(self, text)

    monkeypatch.setattr(reg, "resolve", resolve)
    monkeypatch.setattr(LockedTokenizer, "encode_ids", encode_ids)
    assert acme.generate("acme/support@prod", "hello", max_new_tokens=2).completion_tokens == 2
    assert len(list(acme.stream("acme/support@prod", "streamed", max_new_tokens=2))) >= 1
    outcomes = acme.batch_generate([{"adapter": "acme/support@prod", "prompt": "a",
                                     "max_new_tokens": 2}, {"prompt": "b", "max_new_tokens": 2}])
    assert all(o.completion_tokens == 2 for o in outcomes)
    admin.pin("acme/support@prod")
    admin.unpin("acme/support:v1")
    kinds = [c[0] for c in calls]
    assert kinds.count("encode") == 4 and kinds.count("resolve") == 5, calls
    on_loop = [c for c in calls if c[2] or c[1] == "loraplex-grpc"]
    assert on_loop == [], on_loop


def test_batch_item_past_its_deadline_is_deadline_exceeded_like_generate(edge):
    """The adapter's registry read takes 3 s (a real sleep on the loader thread), the call
    allows 1.5 s: that item reports DEADLINE_EXCEEDED, the other item its response."""
    acme, engine = edge["acme"], edge["engine"]
    edge["admin"].unload("acme/support@prod")
    slow = edge["reg"].resolve(Identity("acme"), "acme/support@prod").digest
    engine.loader.hook = lambda v: time.sleep(3) if v.digest == slow else None
    try:
        t0 = time.monotonic()
        slow_item, base_item = acme.batch_generate(
            [{"adapter": "acme/support@prod", "prompt": "slow", "max_new_tokens": 2},
             {"prompt": "fast", "max_new_tokens": 2}], timeout=1.5)
        took = time.monotonic() - t0
        with pytest.raises(DeadlineExceeded) as alone:
            acme.generate("acme/support@prod", "slow", max_new_tokens=2, timeout=0.5)
    finally:
        engine.loader.hook = None
    assert isinstance(slow_item, DeadlineExceeded), slow_item
    assert base_item.completion_tokens == 2
    assert took < 1.5
    assert type(slow_item) is type(alone.value)
    wait_idle(edge["admin"])


def test_gauges_follow_cancels_on_an_idle_server(edge):
    acme, bg = edge["acme"], edge["bg"]
    url = f"http://127.0.0.1:{bg.metrics_port}/metrics"
    stub = inference_pb2_grpc.InferenceServiceStub(acme.channel)
    calls = [stub.GenerateStream(generate_request(None, f"busy {i}", max_new_tokens=LONG),
                                 metadata=acme.metadata(), timeout=60) for i in range(3)]
    for call in calls:
        next(call)  # each has a token: all three run
    _wait_gauge(url, "loraplex_running_requests", 3)
    for call in calls:
        call.cancel()
    wait_idle(edge["admin"])
    _wait_gauge(url, "loraplex_running_requests", 0)
    assert _gauge(scrape(url), "loraplex_waiting_requests") == 0


def _wait_gauge(url: str, name: str, want: float, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while (got := _gauge(scrape(url), name)) != want:
        assert time.monotonic() < end, f"{name} stuck at {got}, expected {want}"
        time.sleep(0.05)


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))
