"""TLS on every door, checked with a throwaway CA made here (`trustme`): gRPC (sync and
async clients, the CLI), the OpenAI HTTP door (the official `openai` client over https) and
/metrics. A plaintext client is refused by a TLS server, and a server that requires client
certificates (`tls_client_ca`) refuses a client without one."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request

import openai
import pytest
import trustme
from typer.testing import CliRunner

from loraplex.client import AsyncClient, Client
from loraplex.errors import InvalidArgument, Unavailable
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from tests.runtime.serve.test_grpc_inference import settings_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A server CA with a certificate for 127.0.0.1/localhost, and a second CA that signs
    client certificates; every file as PEM on disk, as an operator would have them."""
    root = tmp_path_factory.mktemp("pki")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    leaf = server_ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("client@acme")
    files = {"ca": root / "ca.pem", "cert": root / "server.pem", "key": root / "server.key",
             "client_ca": root / "client-ca.pem", "client_cert": root / "client.pem",
             "client_key": root / "client.key", "other_ca": root / "other-ca.pem"}
    server_ca.cert_pem.write_to_path(str(files["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(files["cert"]))
    leaf.private_key_pem.write_to_path(str(files["key"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    return files


def _registry_server(root, pki, **over):
    values = {"registry": str(root / "reg"), "port": 0, "host": "127.0.0.1",
              "metrics_port": 0, "tls_cert": pki["cert"], "tls_key": pki["key"]}
    values.update(over)
    reg = Registry.open(root / "reg")
    token = reg.create_token(Identity.system(), "acme")
    return BackgroundServer(load_settings(values), registry=reg, with_engine=False), token


def test_tls_client_works_and_plaintext_client_is_refused(tmp_path, pki):
    bg, token = _registry_server(tmp_path, pki)
    with bg:
        with Client(bg.target, token=token, tls_ca=pki["ca"], timeout=10) as c:
            assert list(c.list_adapters().adapters) == []
        with Client(bg.target, token=token, timeout=5) as plain, pytest.raises(Unavailable):
            plain.list_adapters()
        # a CA that did not sign the server's certificate: the client refuses the server
        with Client(bg.target, token=token, tls_ca=pki["other_ca"], timeout=5) as c, \
                pytest.raises(Unavailable):
            c.list_adapters()

        async def over_async() -> int:
            async with AsyncClient(bg.target, token=token, tls_ca=pki["ca"], timeout=10) as c:
                return len((await c.list_adapters()).adapters)
        assert asyncio.run(over_async()) == 0

        # /metrics speaks TLS too
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        url = f"https://127.0.0.1:{bg.metrics_port}/metrics"
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            assert b"loraplex_grpc_requests" in resp.read()
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{bg.metrics_port}/metrics", timeout=5)


def test_mtls_server_refuses_a_client_without_a_certificate(tmp_path, pki):
    bg, token = _registry_server(tmp_path, pki, tls_client_ca=pki["client_ca"])
    with bg:
        with Client(bg.target, token=token, tls_ca=pki["ca"], timeout=5) as c, \
                pytest.raises(Unavailable):
            c.list_adapters()
        with Client(bg.target, token=token, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                    tls_key=pki["client_key"], timeout=10) as c:
            assert list(c.list_adapters().adapters) == []
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            urllib.request.urlopen(f"https://127.0.0.1:{bg.metrics_port}/metrics",
                                   context=ctx, timeout=5).read()
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        with urllib.request.urlopen(f"https://127.0.0.1:{bg.metrics_port}/metrics",
                                    context=ctx, timeout=10) as resp:
            assert resp.status == 200


def test_tls_settings_are_checked(pki):
    with pytest.raises(InvalidArgument, match="tls_cert and tls_key go together"):
        load_settings({"tls_cert": pki["cert"]})
    with pytest.raises(InvalidArgument, match="tls_client_ca needs"):
        load_settings({"tls_client_ca": pki["client_ca"]})
    with pytest.raises(InvalidArgument, match="tls_cert and tls_key go together"):
        Client("127.0.0.1:1", tls_cert=pki["client_cert"])


@pytest.fixture(scope="module")
def engine_world(micro_base, tmp_path_factory, pki):
    root = tmp_path_factory.mktemp("tls-engine")
    reg = Registry.open(root / "reg")
    token = reg.create_token(Identity.system(), "acme")
    settings = settings_for(micro_base, root, http_port=0, http_host="127.0.0.1",
                            tls_cert=pki["cert"], tls_key=pki["key"])
    with BackgroundServer(settings, registry=reg) as bg:
        yield bg, token


def test_openai_client_over_https(engine_world, pki):
    bg, token = engine_world
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    with openai.DefaultHttpxClient(verify=ctx) as http:
        oa = openai.OpenAI(base_url=f"https://127.0.0.1:{bg.http_port}/v1", api_key=token,
                           http_client=http, max_retries=0, timeout=60)
        assert [m.id for m in oa.models.list()][0]
        res = oa.completions.create(model=[m.id for m in oa.models.list()][0],
                                    prompt="the red box", max_tokens=4, temperature=0)
        assert res.usage.completion_tokens >= 1
    plain = openai.OpenAI(base_url=f"http://127.0.0.1:{bg.http_port}/v1", api_key=token,
                          max_retries=0, timeout=5)
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()


def test_cli_generate_reads_the_ca_from_the_environment(engine_world, pki):
    from loraplex.cli import app

    bg, token = engine_world
    env = {"LORAPLEX_TARGET": bg.target, "LORAPLEX_TOKEN": token}
    args = ["generate", "the red box", "--max-new-tokens", "3"]
    ok = CliRunner().invoke(app, args, env={**env, "LORAPLEX_TLS_CA": str(pki["ca"])})
    assert ok.exit_code == 0, ok.output
    assert "tokens" in ok.output
    refused = CliRunner().invoke(app, args + ["--timeout", "5"], env=env)
    assert refused.exit_code != 0
    assert "UNAVAILABLE" in refused.output.upper()
