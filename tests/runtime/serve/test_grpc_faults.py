"""Environment failures seen over a real gRPC channel: honest codes, never INTERNAL.

A server (engine on the micro base) whose registry is PostgreSQL has the registry's own
connections terminated (`pg_terminate_backend`) under RegisterAdapter, SetAlias and
Generate, one by one and then as a storm during traffic; a registry-only server has its
blob storage fill up (tmpfs) and turn read-only (bind mount). The server must answer
UNAVAILABLE with RetryInfo, RESOURCE_EXHAUSTED or FAILED_PRECONDITION, and keep serving.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraplex.client import Client, set_alias_request
from loraplex.errors import FailedPrecondition, LoraplexError, ResourceExhausted, Unavailable
from loraplex.registry import Identity, Registry, RegistrySettings
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from loraplex.v1 import registry_pb2_grpc


def peft_adapter(base, out, seed):
    """An adapter written by peft itself, non-zero B, q/v projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return out


def settings_for(base, registry, blob_dir, **over):
    values = {"base": base, "registry": registry, "blob_dir": blob_dir, "port": 0,
              "host": "127.0.0.1", "metrics_port": 0, "metrics_host": "127.0.0.1",
              "quantization": "none", "device": "cpu", "no_auth": True,
              "engine": {"compute_dtype": "float32"}}
    return load_settings(values | over)


@pytest.fixture
def pg_schema(pg_url):
    """A fresh PostgreSQL schema for this test, dropped after."""
    import uuid

    import sqlalchemy as sa

    schema = f"lpx_test_{uuid.uuid4().hex[:12]}"
    yield schema
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


def retry_delay_s(err: grpc.RpcError) -> float | None:
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


def test_dropped_database_connections_are_unavailable_and_the_server_keeps_serving(
        micro_base, pg_url, pg_schema, tmp_path, tagged_pg_url, backend_killer):
    url, app_name = tagged_pg_url(pg_url)
    reg = Registry.open(url, blob_dir=tmp_path / "blobs",
                        settings=RegistrySettings(db_schema=pg_schema))
    a1, a2 = (peft_adapter(micro_base, tmp_path / f"a{s}", s) for s in (1, 2))
    settings = settings_for(micro_base, url, tmp_path / "blobs")
    with BackgroundServer(settings, registry=reg) as bg, Client(bg.target, timeout=60) as c:
        killer = backend_killer(reg)
        c.register_adapter("acme/support", a1)

        killer.arm(1, writes_only=True)
        with pytest.raises(Unavailable) as e:
            c.register_adapter("acme/support", a2)
        assert e.value.reason == "DatabaseUnavailable" and "retry" in e.value.message
        assert reg.db_where not in e.value.message  # no database host reaches a caller
        assert [v.version for v in c.list_versions("acme/support")] == [1]

        killer.arm(1, writes_only=True)
        stub = registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(bg.target))
        with pytest.raises(grpc.RpcError) as raw:
            stub.SetAlias(set_alias_request("acme/support:v1", "prod"), timeout=30)
        assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
        assert retry_delay_s(raw.value) and retry_delay_s(raw.value) > 0

        killer.arm(1)  # Generate's registry read drops once: retried, the call succeeds
        assert c.generate("acme/support", "hello", max_new_tokens=3).completion_tokens > 0
        killer.arm(100)  # every read drops: UNAVAILABLE, not INTERNAL
        with pytest.raises(Unavailable) as gen:
            c.generate("acme/support", "hello", max_new_tokens=3)
        assert gen.value.reason == "DatabaseUnavailable"
        killer.arm(0)
        assert len(killer.killed) >= 5

        _storm(c, killer, app_name)

        # and afterwards everything works again, on the same server
        assert c.register_adapter("acme/support", a2).adapter.version == 2
        assert c.set_alias("acme/support:v2", "prod").version == 2
        assert c.generate("acme/support@prod", "hello", max_new_tokens=3).completion_tokens > 0
    reg.close()


def _storm(c: Client, killer, app_name: str) -> None:
    """Traffic while the registry's connections are terminated every few milliseconds:
    every call either succeeds or says UNAVAILABLE (what the fault probe got INTERNAL for)."""
    stop = threading.Event()

    def kill_loop() -> None:
        while not stop.is_set():
            killer.terminate(killer.idle_pids(app_name))
            stop.wait(0.02)

    def call(i: int) -> str:
        try:
            if i % 3 == 0:
                c.generate("acme/support", "hi", max_new_tokens=2)
            elif i % 3 == 1:
                c.set_alias("acme/support:v1", f"a{i % 4}")
            else:
                c.get_adapter("acme/support:v1")
            return "OK"
        except LoraplexError as e:
            return e.code

    thread = threading.Thread(target=kill_loop, daemon=True)
    thread.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(call, range(24)))
    finally:
        stop.set()
        thread.join()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert killer.killed


def test_full_and_read_only_blob_storage_over_grpc(micro_base, mounts, fill, tmp_path):
    disk = mounts.tmpfs(tmp_path / "disk", 512)
    db_url = f"sqlite:///{tmp_path / 'meta' / 'registry.db'}"
    reg = Registry.open(db_url, blob_dir=disk / "blobs")
    a1, a2 = (peft_adapter(micro_base, tmp_path / f"a{s}", s) for s in (1, 2))
    reg.register_base(Identity.system(), micro_base)
    settings = settings_for(micro_base, db_url, disk / "blobs")
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg, \
            Client(bg.target, timeout=30) as c:
        c.register_adapter("acme/support", a1)
        filler = fill(disk)
        with pytest.raises(ResourceExhausted) as full:
            c.register_adapter("acme/support", a2)
        assert full.value.reason == "StorageFull" and "full" in full.value.message
        assert str(tmp_path) not in full.value.message  # no server path reaches a caller
        filler.unlink()
        assert [v.version for v in c.list_versions("acme/support")] == [1]

        mounts.read_only(disk / "blobs", disk / "blobs")  # the same path, now read-only
        with pytest.raises(FailedPrecondition) as ro:
            c.register_adapter("acme/support", a2)
        assert ro.value.reason == "StorageReadOnly" and "read-only" in ro.value.message
        assert c.get_adapter("acme/support").version == 1  # reads still work
        assert c.set_alias("acme/support:v1", "prod").version == 1  # DB is writable
    reg.close()
