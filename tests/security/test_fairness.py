"""One tenant must not crowd out the others: per-tenant queue shares on by default,
per-tenant rates refused with RESOURCE_EXHAUSTED and RetryInfo, a prefix cache that never
serves one tenant's cached prompt to another, and heavy registry work (uploads) on a pool
of its own, bounded in number, spooled to disk, unable to starve inference."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraplex.client import Client, register_messages
from loraplex.errors import ResourceExhausted
from loraplex.registry import Identity, Registry
from loraplex.runtime.api.types import EngineConfig, SamplingParams
from loraplex.runtime.engine.engine import Engine
from loraplex.runtime.engine.ratelimit import RateLimited, RateLimiter
from loraplex.runtime.engine.scheduler import Scheduler, Ticket
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.v1 import registry_pb2_grpc
from tests.runtime.serve.test_grpc_inference import make_peft_adapter, settings_for


def test_one_tenant_cannot_fill_the_queue_by_default():
    cfg = EngineConfig(base_dir="unused", max_waiting=16)
    assert cfg.waiting_per_tenant == 4  # a quarter of the queue per tenant
    s = Scheduler(cfg.max_waiting, cfg.aging_s, max_waiting_per_tenant=cfg.waiting_per_tenant)
    for i in range(4):
        s.push(Ticket(f"a{i}", "flood"))
    with pytest.raises(ResourceExhausted, match="per-tenant limit 4"):
        s.push(Ticket("a4", "flood"))
    s.push(Ticket("b0", "quiet"))  # another tenant still gets in
    assert len(s) == 5
    assert EngineConfig(base_dir="x", max_waiting=16,
                        tenant_waiting_share=1.0).waiting_per_tenant == 16


def test_rate_limits_refuse_with_the_time_to_wait():
    now = [0.0]
    rates = RateLimiter(requests_per_minute=2, tokens_per_minute=600, clock=lambda: now[0])
    rates.request("acme")
    rates.request("acme")
    with pytest.raises(RateLimited) as e:
        rates.request("acme")
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert e.value.retry_after_s == pytest.approx(30.0)  # 2 a minute: one every 30 s
    rates.request("globex")  # another tenant has its own allowance
    now[0] = 30.0
    rates.request("acme")
    rates.tokens("acme", 500)
    with pytest.raises(RateLimited, match="tokens per minute") as e:
        rates.tokens("acme", 200)
    assert e.value.retry_after_s == pytest.approx(10.0)  # 100 short at 10 tokens/s


def test_work_gate_bounds_calls_in_progress_globally_and_per_tenant():
    from loraplex.runtime.serve.servicers.state import WorkGate

    gate = WorkGate(total=2, per_tenant=1, what="merges")
    with gate.hold("acme"):
        with pytest.raises(ResourceExhausted, match="per-tenant limit") as e:
            with gate.hold("acme"):
                pass
        assert e.value.retry_after_s > 0
        with gate.hold("globex"):
            with pytest.raises(ResourceExhausted, match="2 merges are in progress"):
                with gate.hold("initech"):
                    pass
    with gate.hold("acme"):  # released on the way out, errors included
        assert gate.in_progress == 1


def _retry_delay(err: grpc.RpcError) -> float | None:
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fairness")
    reg = Registry.open(root / "reg")
    tokens = {t: reg.create_token(Identity.system(), t)
              for t in ("acme", "globex", "initech", "hooli")}
    adapter = make_peft_adapter(micro_base, root / "adapter")
    settings = settings_for(micro_base, root, registry_workers=1, http_port=0,
                            http_host="127.0.0.1", max_concurrent_uploads=2,
                            max_uploads_per_tenant=1, upload_spool_dir=root / "spool",
                            engine={"compute_dtype": "float32",
                                    "tenant_requests_per_minute": 3})
    with BackgroundServer(settings, registry=reg) as bg:
        yield {"bg": bg, "tokens": tokens, "adapter": adapter, "root": root,
               "model": micro_base.name}


def test_request_rate_over_grpc_is_resource_exhausted_with_retry_info(world):
    with Client(world["bg"].target, token=world["tokens"]["initech"], timeout=30) as c:
        with pytest.raises(ResourceExhausted) as e:
            for _ in range(10):  # 3 a minute: a 4th within 20 s is refused
                c.generate(None, "hi", max_new_tokens=1)
    assert "requests per minute" in e.value.message
    raw = e.value.__cause__
    assert isinstance(raw, grpc.RpcError)
    assert 0 < _retry_delay(raw) <= 20.0  # one request refills every 20 s


def test_request_rate_over_http_is_429_with_retry_after(world):
    import http.client
    import json

    def post() -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", world["bg"].http_port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": world["model"], "prompt": "hi", "max_tokens": 1}), headers={
            "authorization": f"Bearer {world['tokens']['hooli']}",
            "content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    statuses = [post() for _ in range(10)]  # 3 a minute
    assert statuses[0].status == 200
    refused = next(r for r in statuses if r.status != 200)
    assert refused.status == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 20


def _stalled_upload(target, token, adapter_dir, gate: threading.Event, sent: threading.Event):
    """A RegisterAdapter stream that sends its header and first chunk, then waits."""
    msgs = register_messages("acme/held", adapter_dir, chunk_bytes=1024)

    def stream():
        for i, m in enumerate(msgs):
            if i == 2:
                sent.set()
                gate.wait(30)
            yield m
    channel = grpc.insecure_channel(target)
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    fut = stub.RegisterAdapter.future(stream(), metadata=[("authorization", f"Bearer {token}")],
                                      timeout=60)
    return channel, fut


def test_uploads_are_spooled_bounded_and_keep_inference_going(world, micro_base):
    bg, tokens = world["bg"], world["tokens"]
    gate, sent = threading.Event(), threading.Event()
    channel, held = _stalled_upload(bg.target, tokens["acme"], world["adapter"], gate, sent)
    try:
        assert sent.wait(20)
        time.sleep(0.2)
        spooled = list((world["root"] / "spool").glob("loraplex-upload-*/*"))
        assert [p.name for p in spooled] == ["adapter_model.safetensors"]  # on disk
        with Client(bg.target, token=tokens["acme"], timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="per-tenant limit") as e:
                c.register_adapter("acme/second", world["adapter"])
            assert _retry_delay(e.value.__cause__) > 0
        # the heavy-registry pool (one worker here) is busy with that stalled upload's
        # writes; another tenant's inference is admitted and served meanwhile
        start = time.monotonic()
        with Client(bg.target, token=tokens["globex"], timeout=30) as c:
            assert c.generate(None, "the red box", max_new_tokens=2).completion_tokens >= 1
        assert time.monotonic() - start < 10
    finally:
        gate.set()
        held.result(60)
        channel.close()
    assert not list((world["root"] / "spool").glob("loraplex-upload-*"))  # cleaned up
    with Client(bg.target, token=tokens["acme"], timeout=60) as c:
        assert c.get_adapter("acme/held").ref.startswith("acme/held")


def test_grpc_server_bounds_concurrent_rpcs(micro_base, tmp_path):
    reg = Registry.open(tmp_path / "reg")
    token = reg.create_token(Identity.system(), "acme")
    adapter = make_peft_adapter(micro_base, tmp_path / "adapter")
    settings = settings_for(micro_base, tmp_path, max_concurrent_rpcs=1, metrics_port=None)
    gate, sent = threading.Event(), threading.Event()
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg:
        channel, held = _stalled_upload(bg.target, token, adapter, gate, sent)
        try:
            assert sent.wait(20)
            with Client(bg.target, token=token, timeout=10) as c, \
                    pytest.raises(ResourceExhausted):
                c.list_adapters()
        finally:
            gate.set()
            held.result(60)
            channel.close()


def test_prefix_cache_is_never_shared_across_tenants(micro_base):
    cfg = EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                       compute_dtype="float32", prefix_cache_blocks=64, kv_block_size=4)
    engine = Engine(cfg).start()
    try:
        prompt = "the quick brown fox jumps over the lazy dog " * 2

        def run(tenant: str) -> int:
            before = engine.stats().prefix_hit_tokens
            req = engine.admit(f"{tenant}-{time.monotonic_ns()}", Identity(tenant), None,
                               prompt=prompt, sampling=SamplingParams(max_new_tokens=1))
            engine.submit(req).wait(60)
            return engine.stats().prefix_hit_tokens - before

        assert run("acme") == 0
        assert run("acme") > 0  # the same tenant reuses its own prefix
        assert run("globex") == 0  # another tenant's identical prompt computes it afresh
        assert run("globex") > 0
    finally:
        engine.shutdown()


@pytest.mark.postgres
def test_a_full_database_pool_is_unavailable_not_internal(pg_url, tmp_path):
    from loraplex.errors import DatabaseUnavailable
    from loraplex.registry.settings import RegistrySettings

    settings = RegistrySettings(db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=0.2,
                                db_schema=f"pool_{time.monotonic_ns()}")
    reg = Registry.open(pg_url, blob_dir=tmp_path / "blobs", settings=settings)
    try:
        with reg.engine.connect():  # the pool's only connection, held
            start = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="every connection is busy") as e:
                reg.list_adapters(Identity.system())
            assert e.value.code == "UNAVAILABLE"
            assert time.monotonic() - start < 5
        assert reg.list_adapters(Identity.system())[0] == []
    finally:
        reg.close()
