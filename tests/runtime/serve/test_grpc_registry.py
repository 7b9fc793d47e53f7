"""RegistryService, auth, tenancy, health and reflection over a real channel (no engine).

A registry-only server (`with_engine=False`) on port 0 with a real registry in a tmp dir;
adapters are made directly with peft on the micro base and registered by streaming.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import sqlalchemy as sa

from loraplex.client import Client
from loraplex.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from loraplex.v1 import registry_pb2, registry_pb2_grpc


def make_peft_adapter(base, out, *, r=4, seed=0, targets=("q_proj", "v_proj")):
    """An adapter written by peft itself (not by loraplex), with non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpc-registry")
    reg = Registry.open(root / "reg")
    settings = load_settings({"base": micro_base, "registry": str(root / "reg"), "port": 0,
                              "host": "127.0.0.1", "metrics_port": 0, "metrics_host": "127.0.0.1",
                              "max_register_bytes": 400_000,
                              # a poll this slow would miss the watch test's window: changes
                              # must reach watchers as they happen, not at the next poll
                              "watch_poll_s": 5.0})
    tokens = {t: reg.create_token(Identity.system(), t) for t in ("acme", "globex")}
    tokens["admin"] = reg.create_token(Identity.system(), "ops", admin=True)
    adapter = make_peft_adapter(micro_base, root / "peft-adapter")
    big = make_peft_adapter(micro_base, root / "big", r=64,
                            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"))
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg:
        clients = {k: Client(bg.target, token=v, timeout=20) for k, v in tokens.items()}
        yield {"bg": bg, "reg": reg, "c": clients, "adapter": adapter, "big": big,
               "anon": Client(bg.target, timeout=20)}
        for c in clients.values():
            c.close()


def test_register_peft_adapter_by_streaming(world):
    acme = world["c"]["acme"]
    resp = acme.register_adapter("acme/support", world["adapter"], chunk_bytes=1000,
                                 lineage={"seed": 0})
    assert resp.created and resp.adapter.ref == "acme/support:v1"
    assert resp.adapter.rank == 4 and set(resp.adapter.target_modules) == {"q_proj", "v_proj"}
    assert json.loads(resp.adapter.lineage_json)["seed"] == 0
    again = acme.register_adapter("acme/support", world["adapter"])
    assert not again.created and again.adapter.digest == resp.adapter.digest
    assert acme.get_adapter("acme/support@latest").digest == resp.adapter.digest


def test_register_refuses_oversized_and_malformed_streams(world):
    acme = world["c"]["acme"]
    with pytest.raises(ResourceExhausted) as e:
        acme.register_adapter("acme/big", world["big"])
    assert e.value.field == "chunk"
    stub = registry_pb2_grpc.RegistryServiceStub(acme.channel)
    with pytest.raises(grpc.RpcError) as raw:
        stub.RegisterAdapter(iter([registry_pb2.RegisterAdapterRequest(chunk=b"x")]),
                             metadata=acme.metadata(), timeout=10)
    assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_base_mismatch_is_failed_precondition(world):
    with pytest.raises(FailedPrecondition) as e:
        world["c"]["acme"].register_adapter("acme/support", world["adapter"],
                                            base_digest="sha256:" + "0" * 64)
    assert e.value.field == "header.base_digest"


def test_alias_compare_and_set(world):
    acme = world["c"]["acme"]
    acme.register_adapter("acme/cas", world["adapter"])
    move = acme.set_alias("acme/cas:v1", "prod", expected=None)
    assert (move.previous_version, move.version) == (0, 1)
    with pytest.raises(FailedPrecondition):
        acme.set_alias("acme/cas:v1", "prod", expected=None)  # exists already
    with pytest.raises(FailedPrecondition):
        acme.set_alias("acme/cas:v1", "prod", expected=7)  # points elsewhere
    assert acme.set_alias("acme/cas:v1", "prod", expected=1).version == 1


def test_tenants_are_isolated_both_ways(world):
    acme, globex = world["c"]["acme"], world["c"]["globex"]
    acme.register_adapter("acme/private", world["adapter"])
    globex.register_adapter("globex/mine", world["adapter"])
    with pytest.raises(NotFound):
        globex.get_adapter("acme/private")
    with pytest.raises(NotFound):
        acme.get_adapter("globex/mine@latest")
    with pytest.raises(NotFound):
        globex.set_alias("acme/private:v1", "prod")
    with pytest.raises(NotFound):
        globex.delete_version("acme/private:v1")
    assert all(a.tenant == "acme" for a in acme.list_adapters().adapters)
    assert [a.ref for a in globex.list_adapters().adapters] == ["globex/mine:v1"]
    assert list(globex.list_adapters(tenant="acme").adapters) == []
    with pytest.raises(PermissionDenied):  # pushing into another tenant's namespace
        globex.register_adapter("acme/intruder", world["adapter"])
    changes = list(globex.watch(timeout=1.0))
    assert changes and all(c.tenant == "globex" for c in changes)
    assert list(globex.watch(after_id=changes[-1].id, timeout=0.5)) == []
    assert [v.ref for v in globex.list_versions("globex/mine")] == ["globex/mine:v1"]
    with pytest.raises(NotFound):
        globex.list_versions("acme/private")


def test_watchers_read_only_the_changes_after_their_position(world):
    """Three watchers at the head of a feed of dozens of changes each get the next change as
    it happens (well within `watch_poll_s`), from the server's one reader of the feed; no
    read of the feed made for them starts before their position (no re-reading from the
    start)."""
    reg, acme = world["reg"], world["c"]["acme"]
    acme.register_adapter("acme/watched", world["adapter"])
    for i in range(30):
        acme.set_alias("acme/watched:v1", f"a{i}")
    head = reg.latest_change_id()
    reads: list[int] = []  # the `id >` bound of every read of lpx_changes

    def on_execute(conn, cursor, statement, parameters, context, executemany):
        if "FROM lpx_changes" in statement and "lpx_changes.id >" in statement:
            reads.append(parameters[0])

    got: dict[int, list] = {}

    def watch(i: int, who: str) -> None:
        got[i] = []
        for change in world["c"][who].watch(after_id=head, timeout=4):
            got[i].append((change.id, change.alias))
            return

    sa.event.listen(reg.engine, "before_cursor_execute", on_execute)
    try:
        watchers = [threading.Thread(target=watch, args=(i, who)) for i, who in
                    enumerate(("acme", "admin", "admin"))]
        for t in watchers:
            t.start()
        end = time.monotonic() + 20
        while len(reads) < 3 and time.monotonic() < end:  # the feed is being read for them
            time.sleep(0.01)
        acme.set_alias("acme/watched:v1", "fresh")
        for t in watchers:
            t.join(30)
    finally:
        sa.event.remove(reg.engine, "before_cursor_execute", on_execute)
    assert got == {i: [(head + 1, "fresh")] for i in range(3)}
    assert reads and min(reads) >= head


def test_admin_sees_every_tenant_and_pages(world):
    acme, admin = world["c"]["acme"], world["c"]["admin"]
    for i in range(3):
        acme.register_adapter(f"acme/page{i}", world["adapter"])
    first = admin.list_adapters(page_size=2)
    assert len(first.adapters) == 2 and first.next_page_token
    seen = [f"{a.tenant}/{a.name}" for a in first.adapters]
    token = first.next_page_token
    while token:
        page = admin.list_adapters(page_size=2, page_token=token)
        seen += [f"{a.tenant}/{a.name}" for a in page.adapters]
        token = page.next_page_token
    assert {"acme/page0", "acme/page2", "globex/mine"} <= set(seen)
    assert len(seen) == len(set(seen))


def test_delete_version(world):
    acme = world["c"]["acme"]
    acme.register_adapter("acme/gone", world["adapter"])
    acme.set_alias("acme/gone:v1", "prod")
    with pytest.raises(FailedPrecondition):
        acme.delete_version("acme/gone:v1")  # an alias points at it
    acme.delete_version("acme/gone:v1", force=True)
    with pytest.raises(NotFound):
        acme.get_adapter("acme/gone:v1")


def test_authentication(world):
    with pytest.raises(Unauthenticated):
        world["anon"].get_adapter("acme/support")
    bad = Client(world["bg"].target, token="lpx_not-a-real-token")
    with pytest.raises(Unauthenticated):
        bad.list_adapters()
    stub = registry_pb2_grpc.RegistryServiceStub(bad.channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.ListAdapters(registry_pb2.ListAdaptersRequest(),
                          metadata=[("authorization", "Basic dXNlcg==")], timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bad.close()


def test_admin_service_needs_admin_role(world):
    with pytest.raises(PermissionDenied):
        world["c"]["acme"].stats()
    with pytest.raises(Unavailable):  # an admin passes auth; this server has no engine
        world["c"]["admin"].stats()


def test_invalid_argument_names_the_field(world):
    with pytest.raises(InvalidArgument) as e:
        world["c"]["acme"].get_adapter("")
    assert e.value.field == "ref" and e.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.reason == "InvalidArgument" and e.value.request_id
    with pytest.raises(InvalidArgument) as e:
        world["c"]["acme"].list_adapters(page_size=5000)
    assert e.value.field == "page_size"


def test_health_and_reflection(world):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    acme = world["c"]["acme"]
    assert acme.health("loraplex.v1.RegistryService") == "SERVING"
    assert acme.health("") == "NOT_SERVING"  # no engine: the server cannot generate
    db = ProtoReflectionDescriptorDatabase(world["anon"].channel)
    services = set(db.get_services())
    assert {"loraplex.v1.InferenceService", "loraplex.v1.RegistryService",
            "loraplex.v1.AdminService", "grpc.health.v1.Health"} <= services
    method = db.FindFileContainingSymbol("loraplex.v1.InferenceService")
    assert method.name == "loraplex/v1/inference.proto"


# -- adapter algebra over the wire ---------------------------------------------------------
def test_compress_and_merge_over_grpc_answer_with_the_new_version(world):
    acme = world["c"]["acme"]
    src = acme.register_adapter("acme/alg", world["adapter"]).adapter
    small = acme.compress_adapter("acme/alg:v1", rank=2)
    assert small.created and small.adapter.ref == "acme/alg:v2" and small.adapter.rank == 2
    lineage = json.loads(small.adapter.lineage_json)
    assert lineage["source"]["digest"] == src.digest and lineage["parameters"] == {"rank": 2}
    energy = acme.compress_adapter("acme/alg:v1", energy=0.5,
                                   scope=registry_pb2.ENERGY_SCOPE_GLOBAL, name="acme/alg-e")
    assert json.loads(energy.adapter.lineage_json)["parameters"]["scope"] == "global"
    merged = acme.merge_adapters(["acme/alg:v1", "acme/alg:v2"], "acme/alg-mix", method="svd",
                                 weights=[1.0, 0.5], svd_rank=3)
    assert merged.adapter.rank == 3
    assert [i["digest"] for i in json.loads(merged.adapter.lineage_json)["inputs"]] == [
        src.digest, small.adapter.digest]
    with pytest.raises(InvalidArgument):
        acme.compress_adapter("acme/alg:v1")  # neither rank nor energy
    with pytest.raises(InvalidArgument, match="density"):
        acme.merge_adapters(["acme/alg:v1", "acme/alg:v2"], "acme/x", method="ties")


def test_algebra_over_grpc_is_tenant_scoped(world):
    acme, globex, admin = (world["c"][k] for k in ("acme", "globex", "admin"))
    acme.register_adapter("acme/own", world["adapter"])
    globex.register_adapter("globex/own", world["adapter"])
    with pytest.raises(NotFound):
        globex.compress_adapter("acme/own:v1", rank=1, name="globex/stolen")
    with pytest.raises(NotFound):
        globex.merge_adapters(["globex/own", "acme/own"], "globex/mix")
    with pytest.raises(NotFound):  # admins may read both, but not mix tenants
        admin.merge_adapters(["globex/own", "acme/own"], "globex/mix")
    with pytest.raises(NotFound):
        globex.get_adapter("globex/stolen")
