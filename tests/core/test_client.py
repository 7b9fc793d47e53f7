"""loraplex.client: request building, error translation, and the same cases run against the
sync and the asyncio client over a real channel (a real server, engine on the micro base)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from safetensors.torch import save_file

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
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.grpc_errors import map_error, rich_status
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings


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


# -- both clients, one set of cases ------------------------------------------------------------

class Awaited:
    """The async client driven from plain test code: every awaitable is awaited and every
    async iterator collected on the client's own loop, so each case below reads the same for
    both clients."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client, self._loop = client, loop

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def run(*args, **kw):
            out = attr(*args, **kw)
            if inspect.isawaitable(out):
                return self._loop.run_until_complete(out)
            if hasattr(out, "__anext__"):
                return self._loop.run_until_complete(_collect(out))
            return out

        return run


async def _collect(stream):
    return [x async for x in stream]


def _open(kind: str, target: str, **kw):
    """(client, close) for "sync" or "async"."""
    if kind == "sync":
        c = Client(target, **kw)
        return c, c.close
    loop = asyncio.new_event_loop()

    async def make():
        return AsyncClient(target, **kw)

    c = loop.run_until_complete(make())

    def close():
        loop.run_until_complete(c.close())
        loop.close()

    return Awaited(c, loop), close


@pytest.fixture(scope="module")
def served(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    reg = Registry.open(root / "reg")
    system = Identity.system()
    tokens = {"acme": reg.create_token(system, "acme"),
              "admin": reg.create_token(system, "ops", admin=True)}
    settings = load_settings({"base": micro_base, "registry": str(root / "reg"), "port": 0,
                              "host": "127.0.0.1", "metrics_port": 0,
                              "metrics_host": "127.0.0.1", "quantization": "none",
                              "device": "cpu", "max_batch": 4,
                              "engine": {"compute_dtype": "float32"}})
    with BackgroundServer(settings, registry=reg) as bg:
        yield {"target": bg.target, "tokens": tokens, "root": root, "base": micro_base}


@pytest.fixture(params=["sync", "async"])
def client(request, served):
    c, close = _open(request.param, served["target"], token=served["tokens"]["acme"],
                     timeout=30)
    yield c
    close()


def _adapter_dir(base, out):
    """A valid peft-layout adapter for q/v of the micro base (written directly)."""
    import torch

    from loraplex.fingerprint import fingerprint_base

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (fan_in, fan_out) in fingerprint_base(base).linear_shapes.items():
        if module.endswith(("q_proj", "v_proj")):
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(4, fan_in,
                                                                              generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(fan_out, 4,
                                                                              generator=g)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base), "bias": "none"}))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_request_ids_are_echoed(client):
    g = client.generate(None, "hello", max_new_tokens=3, request_id="rid-gen")
    assert g.request_id == "rid-gen" and g.completion_tokens == 3
    with pytest.raises(errors.NotFound) as e:
        client.get_adapter("acme/nothing", request_id="rid-missing")
    assert e.value.request_id == "rid-missing"
    with pytest.raises(errors.NotFound) as e:  # no id given: the client made one, and says it
        client.get_adapter("acme/nothing")
    assert len(e.value.request_id) == 32


def test_stream_ends_with_what_generate_returns(client):
    g = client.generate(None, "abc", max_new_tokens=5)
    chunks = list(client.stream(None, "abc", max_new_tokens=5, request_id="rid-stream"))
    final = chunks[-1].final
    assert final.token_ids == g.token_ids and final.text == g.text
    assert final.request_id == "rid-stream"
    assert sum((c.token_ids for c in chunks), []) == g.token_ids


def test_errors_map_to_the_same_typed_exceptions(client, served):
    with pytest.raises(errors.InvalidArgument) as e:
        client.get_adapter("")
    assert e.value.field == "ref" and e.value.status_code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.PermissionDenied):
        client.stats()  # a tenant token is no admin
    with pytest.raises(errors.InvalidArgument) as e:
        client.generate(None, "x", max_new_tokens=3, top_p=2.0)
    assert e.value.field == "sampling.top_p"
    out = client.batch_generate([{"adapter": None, "prompt": "ok", "max_new_tokens": 2},
                                 {"adapter": "acme/nothing", "prompt": "x"}])
    assert out[0].completion_tokens == 2 and type(out[1]) is errors.NotFound
    with pytest.raises(errors.InvalidArgument) as e:
        client.register_adapter("acme/x", served["root"] / "no-such-dir")
    assert e.value.field == "adapter_dir"
    assert list(client.watch(timeout=0.3)) == []  # ends quietly at its deadline


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_bad_token_is_unauthenticated_with_its_request_id(served, kind):
    c, close = _open(kind, served["target"], token="lpx_not-a-token", timeout=10)
    try:
        with pytest.raises(errors.Unauthenticated) as e:
            c.list_adapters(request_id="rid-auth")
        assert e.value.request_id == "rid-auth"
    finally:
        close()


def test_streaming_upload_stores_the_adapter_as_pushed(client, served, tmp_path):
    """Uploaded in 1 KiB chunks (many messages): the server stores exactly what a local
    push of the same files stores (same digest), then serves it."""
    adir = _adapter_dir(served["base"], tmp_path / "adapter")
    assert len(list(register_messages("acme/up", adir, chunk_bytes=1024))) > 5
    local = Registry.open(tmp_path / "local")
    local.register_base(Identity.system(), served["base"])
    want = local.push(Identity("acme"), adir, "acme/up", base=served["base"]).digest
    name = f"acme/up-{type(client).__name__.lower()}"
    resp = client.register_adapter(name, adir, chunk_bytes=1024)
    assert resp.adapter.digest == want and resp.adapter.rank == 4
    assert client.generate(name, "hi", max_new_tokens=2).adapter_digest == want


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_ready(served, kind):
    c, close = _open(kind, served["target"], timeout=10)
    try:
        c.wait_ready(10)
        assert c.health() == "SERVING"
    finally:
        close()
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    c, close = _open(kind, dead)
    try:
        with pytest.raises(errors.Unavailable, match="not SERVING after"):
            c.wait_ready(0.5)
    finally:
        close()


def test_both_clients_have_the_same_methods():
    names = {n for n in dir(Client) if not n.startswith("_")}
    assert names == {n for n in dir(AsyncClient) if not n.startswith("_")}
    assert {"generate", "stream", "register_adapter", "wait_ready", "watch"} <= names


def test_no_auth_logs_a_warning(micro_base, tmp_path, caplog):
    from loraplex.runtime.serve.server import create_server

    settings = load_settings({"base": micro_base, "registry": str(tmp_path / "reg"),
                              "port": 0, "host": "127.0.0.1", "no_auth": True})

    async def build():
        server, port = create_server(settings, with_engine=False)
        assert port > 0
        await server.close()

    with caplog.at_level(logging.WARNING, logger="loraplex.runtime.serve.server"):
        asyncio.run(build())
    assert "authentication is OFF" in caplog.text
