"""loraplex.client: request building, error translation, and the asyncio client over a real
channel (registry-only server, --no-auth, so no model is needed)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from loraplex import errors
from loraplex.client import (
    AsyncClient,
    Client,
    RpcError,
    generate_request,
    register_messages,
    set_alias_request,
    typed_error,
)
from loraplex.registry import Registry
from loraplex.runtime.grpc_errors import map_error, rich_status
from loraplex.runtime.server import BackgroundServer
from loraplex.runtime.settings import load_settings


class FakeCall(grpc.RpcError, grpc.Call):
    """What a failed grpc call looks like to `typed_error`."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self):
        return self._status.code

    def details(self):
        return self._status.details

    def trailing_metadata(self):
        return self._status.trailing_metadata

    def initial_metadata(self):
        return ()

    def is_active(self):
        return False

    def time_remaining(self):
        return None

    def cancel(self):
        return False

    def add_callback(self, callback):
        return False


def test_generate_request_sets_only_given_sampling_fields():
    req = generate_request("acme/support@prod", "hi", max_new_tokens=5, seed=3,
                           stop=["\n"], request_id="r1")
    assert req.sampling.HasField("max_new_tokens") and req.sampling.seed == 3
    assert not req.sampling.HasField("top_p")
    assert list(req.sampling.stop) == ["\n"] and req.request_id == "r1"
    assert generate_request(None, prompt_ids=[1, 2]).adapter == ""


def test_register_messages_stream_header_then_chunks(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x" * 2500)
    msgs = list(register_messages("acme/a", tmp_path, lineage={"k": 1}, chunk_bytes=1000))
    assert msgs[0].WhichOneof("part") == "header" and msgs[0].header.size_bytes == 2500
    assert [len(m.chunk) for m in msgs[1:]] == [1000, 1000, 500]


def test_set_alias_request_expectations():
    assert set_alias_request("a/b:v2", "prod").WhichOneof("expected") is None
    assert set_alias_request("a/b:v2", "prod", None).expect_absent
    assert set_alias_request("a/b:v2", "prod", 1).expected_version == 1


@pytest.mark.parametrize("error,cls", [
    (errors.InvalidArgument("bad top_p", field="sampling.top_p"), errors.InvalidArgument),
    (errors.NotFound("no such adapter"), errors.NotFound),
    (errors.AliasConflict("moved"), errors.FailedPrecondition),
    (errors.Overloaded("queue full"), errors.ResourceExhausted),
    (errors.Unavailable("draining"), errors.Unavailable),
    (errors.DataCorruption("digest mismatch"), errors.DataCorruption),
])
def test_server_errors_round_trip_to_typed_client_errors(error, cls):
    status = rich_status(map_error(error), "rid-1")
    back = typed_error(FakeCall(status))
    assert type(back) is cls and back.message == error.message
    assert back.field == error.field and back.request_id == "rid-1"
    assert back.reason == type(error).__name__ and back.status_code.name == error.code


def test_rich_details_carry_field_and_retry_hint():
    status = rich_status(map_error(errors.Overloaded("full", field="request")), "r")
    decoded = status_pb2.Status.FromString(dict(status.trailing_metadata)[
        "grpc-status-details-bin"])
    assert decoded.code == code_pb2.RESOURCE_EXHAUSTED
    kinds = {d.type_url.rsplit(".", 1)[-1] for d in decoded.details}
    assert kinds == {"ErrorInfo", "BadRequest", "RetryInfo"}
    bad = error_details_pb2.BadRequest()
    next(d for d in decoded.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert bad.field_violations[0].field == "request"


def test_non_domain_errors_are_internal_and_logged(caplog):
    with caplog.at_level(logging.ERROR):
        mapped = map_error(KeyError("secret"), "rid-9")
    assert mapped.code == grpc.StatusCode.INTERNAL and "secret" not in mapped.message
    assert "rid-9" in mapped.message and "rid-9" in caplog.text
    back = typed_error(FakeCall(rich_status(mapped, "rid-9")))
    assert isinstance(back, RpcError) and back.code == "INTERNAL"


@pytest.fixture(scope="module")
def open_server(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    settings = load_settings({"base": micro_base, "registry": str(root / "reg"), "port": 0,
                              "host": "127.0.0.1", "metrics_port": 0,
                              "metrics_host": "127.0.0.1", "no_auth": True})
    with BackgroundServer(settings, registry=Registry.open(root / "reg"),
                          with_engine=False) as bg:
        yield bg


def test_no_auth_makes_every_caller_an_admin(open_server, caplog):
    with Client(open_server.target) as c:
        assert c.list_adapters(tenant="anyone").adapters == []
        with pytest.raises(errors.Unavailable):  # admin passes auth; no engine here
            c.stats()


def test_async_client_over_a_real_channel(open_server):
    async def main():
        async with AsyncClient(open_server.target, timeout=10) as c:
            assert await c.health("loraplex.v1.RegistryService") == "SERVING"
            with pytest.raises(errors.NotFound):
                await c.get_adapter("acme/nothing")
            with pytest.raises(errors.InvalidArgument) as e:
                await c.get_adapter("")
            assert e.value.field == "ref"
            with pytest.raises(errors.Unavailable):
                await c.generate(None, "hi")
            assert (await c.list_adapters()).adapters == []
            assert [ch async for ch in c.watch(timeout=0.3)] == []

    asyncio.run(main())


def test_no_auth_logs_a_warning(micro_base, tmp_path, caplog):
    from loraplex.runtime.server import create_server

    settings = load_settings({"base": micro_base, "registry": str(tmp_path / "reg"),
                              "port": 0, "host": "127.0.0.1", "no_auth": True})

    async def build():
        server, port = create_server(settings, with_engine=False)
        assert port > 0
        await server.close()

    with caplog.at_level(logging.WARNING, logger="loraplex.runtime.server"):
        asyncio.run(build())
    assert "authentication is OFF" in caplog.text
