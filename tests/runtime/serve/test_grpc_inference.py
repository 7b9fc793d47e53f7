"""InferenceService and AdminService over a real channel: a real engine on the micro base
(quantization "none", fp32), a real registry in a tmp dir, port 0.

Covers every status code a caller can get, tenant isolation both ways, a cancel and a
deadline freeing engine capacity, and an alias move in the middle of a stream.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.client import AsyncClient, Client, generate_request, typed_error
from loraplex.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LoraplexError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.metrics import scrape
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from loraplex.v1 import inference_pb2, inference_pb2_grpc

LONG = 200  # tokens: long enough that a test can act while the request runs


def make_peft_adapter(base, out, *, seed=0):
    """An adapter written by peft itself (random non-zero A and B) for q/v projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def settings_for(base, root, **over):
    values = {"base": base, "registry": str(root / "reg"), "port": 0, "host": "127.0.0.1",
              "metrics_port": 0, "metrics_host": "127.0.0.1", "quantization": "none", "device": "cpu",
              "max_batch": 8, "max_waiting": 16,
              "engine": {"compute_dtype": "float32", "base_gemm": "packed"}}
    values.update(over)
    return load_settings(values)


@pytest.fixture(scope="module")
def world(micro_base, base_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-inference")
    reg = Registry.open(root / "reg")
    system = Identity.system()
    tokens = {t: reg.create_token(system, t) for t in ("acme", "globex")}
    tokens["admin"] = reg.create_token(system, "ops", admin=True)
    with BackgroundServer(settings_for(micro_base, root), registry=reg) as bg:
        clients = {k: Client(bg.target, token=v, timeout=60) for k, v in tokens.items()}
        for seed, (tenant, name) in enumerate([("acme", "support"), ("globex", "sales")]):
            clients[tenant].register_adapter(
                f"{tenant}/{name}", make_peft_adapter(micro_base, root / name, seed=seed))
            clients[tenant].set_alias(f"{tenant}/{name}:v1", "prod")
        other_base = base_factory("micro", "qwen2")
        reg.register_base(system, other_base)
        reg.push(system, make_peft_adapter(other_base, root / "foreign"), "acme/foreign",
                 base=other_base)
        yield {"bg": bg, "reg": reg, "c": clients, "root": root, "base": micro_base}
        for c in clients.values():
            c.close()


def wait_idle(admin: Client, timeout: float = 10.0):
    """Engine stats once no sequence runs or waits (capacity freed, KV blocks returned)."""
    end = time.monotonic() + timeout
    while True:
        stats = admin.stats()
        if (stats.running, stats.waiting, stats.kv_rows_used, stats.kv_used_bytes) == \
                (0, 0, 0, 0) and stats.kv_reserved_bytes < stats.kv_limit_bytes:
            return stats
        if time.monotonic() > end:
            raise AssertionError(f"engine still busy: {stats}")
        time.sleep(0.02)


def test_generate_reports_version_usage_and_timings(world):
    acme = world["c"]["acme"]
    g = acme.generate("acme/support@prod", "hello", max_new_tokens=6, request_id="client-1")
    assert g.request_id == "client-1"
    assert g.adapter_ref == "acme/support:v1" and g.adapter_digest.startswith("sha256:")
    assert g.finish_reason == "length" and g.completion_tokens == len(g.token_ids) == 6
    assert g.prompt_tokens == 5
    assert 0 < g.timings["first_token_s"] <= g.timings["total_s"]
    again = acme.generate(None, prompt_ids=list(b"hello"), max_new_tokens=6)
    assert again.adapter_ref == "" and again.prompt_tokens == 5


def test_stream_chunks_add_up_to_the_unary_answer(world):
    acme = world["c"]["acme"]
    unary = acme.generate("acme/support@prod", "stream me", max_new_tokens=12)
    chunks = list(acme.stream("acme/support@prod", "stream me", max_new_tokens=12))
    final = chunks[-1].final
    assert final is not None and all(c.final is None for c in chunks[:-1])
    assert final.token_ids == unary.token_ids and final.text == unary.text
    assert sum(len(c.token_ids) for c in chunks) == 12


def test_batch_mixes_tenants_base_and_per_item_errors(world):
    admin = world["c"]["admin"]
    out = admin.batch_generate([
        dict(adapter="acme/support@prod", prompt="a", max_new_tokens=4),
        dict(adapter="globex/sales@prod", prompt="b", max_new_tokens=4),
        dict(adapter=None, prompt="c", max_new_tokens=4),
        dict(adapter="acme/missing", prompt="d"),
        dict(adapter="acme/support", prompt="e", top_p=2.0),
    ])
    assert [getattr(o, "adapter_ref", None) for o in out[:3]] == [
        "acme/support:v1", "globex/sales:v1", ""]
    assert isinstance(out[3], NotFound)
    assert isinstance(out[4], InvalidArgument) and out[4].field == "items[4].sampling.top_p"


def test_tenants_cannot_use_each_others_adapters(world):
    acme, globex = world["c"]["acme"], world["c"]["globex"]
    with pytest.raises(NotFound):
        acme.generate("globex/sales@prod", "x", max_new_tokens=2)
    with pytest.raises(NotFound):
        list(globex.stream("acme/support:v1", "x", max_new_tokens=2))
    digest = acme.get_adapter("acme/support:v1").digest
    with pytest.raises(NotFound):
        globex.generate(digest, "x", max_new_tokens=2)
    assert [a.name for a in globex.list_models().adapters] == ["sales"]
    assert "foreign" not in [a.name for a in acme.list_models().adapters]  # other base


def test_list_models_pages_by_keyset(world):
    admin = world["c"]["admin"]
    first = admin.list_models(page_size=1)  # acme/foreign: another base, left out
    assert first.base.quantization == "none" and list(first.adapters) == []
    assert first.next_page_token
    second = admin.list_models(page_size=1, page_token=first.next_page_token)
    assert [a.ref for a in second.adapters] == ["acme/support:v1"]
    assert [a.ref for a in admin.iter_models(page_size=1)] == ["acme/support:v1",
                                                              "globex/sales:v1"]

    async def walk() -> list[str]:
        async with AsyncClient(world["bg"].target, token=admin.token, timeout=60) as c:
            return [a.ref async for a in c.iter_models(page_size=1)]

    assert asyncio.run(walk()) == ["acme/support:v1", "globex/sales:v1"]
    assert [a.ref for a in admin.list_models().adapters] == ["acme/support:v1",
                                                            "globex/sales:v1"]
    assert not admin.list_models().next_page_token
    with pytest.raises(InvalidArgument) as e:
        admin.list_models(page_size=5000)
    assert e.value.field == "page_size"
    with pytest.raises(InvalidArgument) as e:
        admin.list_models(page_token="not-a-token")
    assert e.value.field == "page_token"


def test_status_codes(world):
    acme = world["c"]["acme"]
    with pytest.raises(InvalidArgument) as e:
        acme.generate("acme/support", "x", top_p=0.0 + 5)
    assert e.value.field == "sampling.top_p"
    with pytest.raises(InvalidArgument) as e:
        acme.generate("acme/support", "x", prompt_ids=[1, 2])
    assert e.value.field == "prompt_ids"
    with pytest.raises(InvalidArgument) as e:
        acme.generate("not a ref!", "x")
    with pytest.raises(NotFound):
        acme.generate("acme/support:v99", "x")
    with pytest.raises(FailedPrecondition):  # adapter made for another base
        acme.generate("acme/foreign", "x", max_new_tokens=2)
    with pytest.raises(Unauthenticated):
        Client(world["bg"].target).generate(None, "x")
    with pytest.raises(PermissionDenied):
        acme.resident()


def test_admin_controls_residency(world):
    admin = world["c"]["admin"]
    pinned = admin.pin("globex/sales@prod")
    assert pinned.ref == "globex/sales:v1" and pinned.digest.startswith("sha256:")
    resident = {a.ref: a for a in admin.resident().adapters}
    assert resident["globex/sales:v1"].pinned and resident["globex/sales:v1"].slot >= 1
    admin.unpin("globex/sales:v1")
    admin.unload("globex/sales:v1")
    assert "globex/sales:v1" not in {a.ref for a in admin.resident().adapters}
    admin.prefetch("globex/sales@prod")
    admin.prefetch("acme/support@prod")
    view = admin.resident()
    assert "globex/sales:v1" in {a.ref for a in view.adapters} and not view.truncated
    assert view.host_limit_bytes == 1 << 30 and view.host_loading_bytes == 0
    assert view.host_bytes == sum(a.size_bytes for a in view.adapters if a.on_host) > 0
    assert view.device_bytes == sum(a.size_bytes for a in view.adapters if a.slot)
    one = admin.resident(limit=1)  # a bounded answer that says it left some out
    assert len(one.adapters) == 1 and one.truncated and one.adapters[0].slot >= 1
    with pytest.raises(InvalidArgument):
        admin.resident(limit=5000)
    stats = admin.stats()
    assert stats.ready and not stats.draining and stats.requests_finished > 0
    assert (stats.compute_dtype, stats.compute_reason) == ("float32", "set explicitly")
    assert (stats.base_gemm, stats.base_gemm_reason) == ("packed", "set explicitly")
    assert (stats.host_bytes, stats.device_bytes) == (view.host_bytes, view.device_bytes)
    assert stats.host_bytes <= stats.host_peak_bytes <= stats.host_limit_bytes
    text = scrape(f"http://127.0.0.1:{world['bg'].server.metrics_port}/metrics")
    tiers = {s.labels["tier"]: s.value for f in text_string_to_metric_families(text)
             if f.name == "loraplex_adapter_bytes" for s in f.samples}
    assert tiers["host"] == view.host_bytes and tiers["device"] == view.device_bytes
    assert tiers["host_limit"] == 1 << 30 and tiers["loading"] == 0


def test_deadline_is_honoured_and_frees_the_sequence(world):
    acme, admin = world["c"]["acme"], world["c"]["admin"]
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        acme.generate("acme/support@prod", "slow", max_new_tokens=LONG, timeout=0.3)
    assert time.monotonic() - start < 2.0
    wait_idle(admin)
    assert acme.generate("acme/support@prod", "after", max_new_tokens=2).completion_tokens == 2


def test_client_cancel_frees_the_slot(world):
    acme, admin = world["c"]["acme"], world["c"]["admin"]
    stub = inference_pb2_grpc.InferenceServiceStub(acme.channel)
    call = stub.GenerateStream(generate_request("acme/support@prod", "cancel me",
                                                max_new_tokens=LONG),
                               metadata=acme.metadata(), timeout=60)
    next(call)
    assert admin.stats().running == 1
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    wait_idle(admin)


def test_queue_full_is_resource_exhausted(world):
    """One row, one waiting place: of six requests sent at once, at least one is refused as
    Overloaded, and nothing is left running once the others are cancelled. Six, not three:
    all six are accepted only if the engine finishes four requests of `LONG` tokens while
    the six arrive, whereas with three a fast CPU can finish the first on the micro base
    before a slow third call reaches the queue (CI saw all three accepted)."""
    reg = world["reg"]
    settings = settings_for(world["base"], world["root"], max_batch=1, max_waiting=1)
    with BackgroundServer(settings, registry=reg) as bg:
        c = Client(bg.target, token=reg.create_token(Identity.system(), "acme"), timeout=60)
        admin = Client(bg.target, token=reg.create_token(Identity.system(), "ops", admin=True))
        stub = inference_pb2_grpc.InferenceServiceStub(c.channel)
        calls = [stub.GenerateStream(generate_request(None, f"fill {i}", max_new_tokens=LONG),
                                     metadata=c.metadata(), timeout=60) for i in range(6)]
        refused = []
        for call in calls:
            try:
                next(call)
            except grpc.RpcError as e:
                refused.append(typed_error(e))
        assert refused and all(isinstance(e, ResourceExhausted) for e in refused), refused
        assert {e.reason for e in refused} == {"Overloaded"}
        for call in calls:
            call.cancel()
        wait_idle(admin)
        c.close()
        admin.close()


def test_alias_move_mid_stream_finishes_on_the_old_version(world):
    acme = world["c"]["acme"]
    v2 = acme.register_adapter("acme/support", make_peft_adapter(
        world["base"], world["root"] / "support-v2", seed=7)).adapter
    assert v2.ref == "acme/support:v2"
    stream = acme.stream("acme/support@prod", "moving", max_new_tokens=40)
    first = next(stream)
    assert first.final is None
    acme.set_alias("acme/support:v2", "prod", expected=1)
    new = acme.generate("acme/support@prod", "new", max_new_tokens=2)
    rest = list(stream)
    assert rest[-1].final.adapter_ref == "acme/support:v1"
    assert rest[-1].final.finish_reason == "length"
    assert new.adapter_ref == "acme/support:v2" and new.adapter_digest == v2.digest
    acme.set_alias("acme/support:v1", "prod", expected=2)


def test_unexpected_errors_are_internal_and_logged(world, monkeypatch, caplog):
    engine = world["bg"].server.engine

    def broken():
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(engine, "stats", broken)
    with pytest.raises(LoraplexError) as e:
        world["c"]["admin"].stats()
    assert e.value.status_code == grpc.StatusCode.INTERNAL
    assert "secret" not in str(e.value) and e.value.request_id in str(e.value)


def test_health_serving_once_base_loaded(world):
    admin = world["c"]["admin"]
    assert admin.health() == "SERVING"
    assert admin.health("loraplex.v1.InferenceService") == "SERVING"
    models = admin.list_models()
    assert models.base.digest == world["reg"].register_base(Identity.system(),
                                                            world["base"]).digest
    assert inference_pb2.FINISH_REASON_DEADLINE == 4


def test_generate_cli_unary_and_stream(world):
    from typer.testing import CliRunner

    from loraplex.cli import app

    token = world["c"]["acme"].token
    args = ["generate", "--adapter", "acme/support@prod", "--target", world["bg"].target,
            "--token", token, "--max-new-tokens", "5", "hello"]
    unary = CliRunner().invoke(app, args)
    assert unary.exit_code == 0, unary.output
    assert "acme/support:v1" in unary.output and "length" in unary.output
    streamed = CliRunner().invoke(app, [*args, "--stream"])
    assert streamed.exit_code == 0, streamed.output
    refused = CliRunner().invoke(app, ["generate", "--adapter", "globex/sales@prod",
                                       "--target", world["bg"].target, "--token", token, "x"])
    assert refused.exit_code == 1 and "NOT_FOUND" in refused.output


def test_async_client_streams_and_abandoning_frees_the_slot(world):
    import asyncio

    from loraplex.client import AsyncClient

    async def main():
        async with AsyncClient(world["bg"].target, token=world["c"]["acme"].token,
                               timeout=60) as c:
            g = await c.generate("acme/support@prod", "async", max_new_tokens=4)
            assert g.adapter_ref == "acme/support:v1" and g.completion_tokens == 4
            chunks = [ch async for ch in c.stream("acme/support@prod", "async",
                                                  max_new_tokens=4)]
            assert chunks[-1].final.token_ids == g.token_ids
            stream = c.stream("acme/support@prod", "abandon", max_new_tokens=LONG)
            await stream.__anext__()
            await stream.aclose()  # cancels the call

    asyncio.run(main())
    wait_idle(world["c"]["admin"])


def test_default_nf4_base_serves_an_adapter(world):
    """The default quantization (4-bit NF4 base) answers over gRPC too."""
    settings = settings_for(world["base"], world["root"], quantization="nf4")
    with BackgroundServer(settings, registry=world["reg"]) as bg:
        c = Client(bg.target, token=world["c"]["acme"].token, timeout=60)
        g = c.generate("acme/support@prod", "four bits", max_new_tokens=4)
        assert g.completion_tokens == 4 and g.adapter_ref.startswith("acme/support:")
        assert c.list_models().base.quantization == "nf4"
        c.close()


def test_health_not_serving_until_the_base_is_loaded(world, monkeypatch):
    import threading

    from loraplex.errors import Unavailable
    from loraplex.runtime.engine.engine import Engine
    from loraplex.runtime.serve.server import create_server

    gate, real_start = threading.Event(), Engine.start

    def slow_start(self, **kw):
        gate.wait(60)
        return real_start(self, **kw)

    monkeypatch.setattr(Engine, "start", slow_start)
    bg = BackgroundServer(settings_for(world["base"], world["root"]), registry=world["reg"])
    bg._thread.start()

    async def boot():  # start without waiting for readiness
        server, port = create_server(bg.settings, registry=world["reg"])
        await server.start()
        return server, port

    bg.server, bg.port = bg.call(boot())
    try:
        c = Client(bg.target, token=world["c"]["admin"].token, timeout=30)
        assert c.health() == "NOT_SERVING"
        assert c.health("loraplex.v1.InferenceService") == "NOT_SERVING"
        assert c.health("loraplex.v1.RegistryService") == "SERVING"
        with pytest.raises(Unavailable):
            c.generate(None, "too early", max_new_tokens=2)
        gate.set()
        c.wait_ready(60)
        assert c.generate(None, "now", max_new_tokens=2).completion_tokens == 2
        c.close()
    finally:
        gate.set()
        bg.stop()
