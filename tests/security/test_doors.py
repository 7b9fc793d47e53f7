"""Who may listen where: `--no-auth` only on loopback listeners (or the loudly named
override), /metrics on loopback by default with every label bounded, and request ids a
caller sends are bounded before anything logs or echoes them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest

from loraplex.client import Client
from loraplex.errors import InvalidArgument, NotFound
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.metrics import ServerMetrics
from loraplex.runtime.serve.router_metrics import LORA_INFO
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings


def test_no_auth_is_refused_on_a_public_listener():
    with pytest.raises(InvalidArgument, match=r"host=0\.0\.0\.0"):
        load_settings({"no_auth": True})  # gRPC binds 0.0.0.0 by default
    with pytest.raises(InvalidArgument, match=r"http_host=0\.0\.0\.0"):
        load_settings({"no_auth": True, "host": "127.0.0.1", "http_port": 8000})
    with pytest.raises(InvalidArgument, match=r"metrics_host=10\.1\.2\.3"):
        load_settings({"no_auth": True, "host": "::1", "metrics_host": "10.1.2.3"})
    ok = load_settings({"no_auth": True, "host": "127.0.0.1", "http_port": 8000,
                        "http_host": "localhost"})
    assert ok.no_auth
    loud = load_settings({"no_auth": True,
                          "no_auth_on_public_interfaces_i_understand": True})
    assert loud.no_auth and loud.host == "0.0.0.0"  # noqa: S104


def test_no_auth_flag_is_refused_by_the_cli(tmp_path):
    from typer.testing import CliRunner

    from loraplex.cli import app

    out = CliRunner().invoke(app, ["serve", "--base", str(tmp_path), "--no-auth"])
    assert out.exit_code != 0
    assert "loopback" in out.output


def test_metrics_bind_loopback_by_default():
    assert load_settings({}).metrics_host == "127.0.0.1"


@dataclass
class _Req:
    request_id: str
    tenant: str
    adapter: str | None


def _label_values(text: str, metric: str, label: str) -> set[str]:
    values = set()
    for line in text.splitlines():
        if line.startswith(metric + "{") and f'{label}="' in line:
            values.add(line.split(f'{label}="', 1)[1].split('"', 1)[0])
    return values


def test_tenant_adapter_and_router_labels_are_bounded():
    m = ServerMetrics(top_k=5)

    @dataclass
    class Stats:
        slots_total: int = 4
        running: int = 0
        waiting: int = 200
        kv_limit_bytes: int = 1
        kv_used_bytes: int = 0

    m.router.bind(Stats, lambda: [])
    for i in range(200):
        m.on_request_queued(_Req(f"r{i}", f"tenant{i}", f"tenant{i}/adapter{i}:v1"))
        m.on_request_rejected(f"tenant{i}", f"tenant{i}/x{i}", "NOT_FOUND")
    text = generate_latest(m.registry).decode()
    tenants = _label_values(text, "loraplex_requests_total", "tenant")
    assert len(tenants) <= 6 and "other" in tenants
    assert len(_label_values(text, "loraplex_requests_total", "adapter")) <= 6
    waiting = _label_values(text, LORA_INFO.replace(":", ":"), "waiting_lora_adapters")
    (listed,) = waiting
    assert len(listed.split(",")) == 5  # 200 adapters queue; the label names 5


def test_request_ids_are_bounded_before_they_are_echoed(tmp_path):
    reg = Registry.open(tmp_path / "reg")
    token = reg.create_token(Identity.system(), "acme")
    settings = load_settings({"registry": str(tmp_path / "reg"), "port": 0,
                              "host": "127.0.0.1", "metrics_port": None})
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg, \
            Client(bg.target, token=token, timeout=10) as c:
        with pytest.raises(NotFound) as plain:
            c.get_adapter("acme/missing", request_id="trace-42.a:b_c")
        assert plain.value.request_id == "trace-42.a:b_c"
        for hostile in ("x" * 5000, "id with spaces {} and \"quotes\""):
            with pytest.raises(NotFound) as e:
                c.get_adapter("acme/missing", request_id=hostile)
            assert e.value.request_id != hostile
            assert len(e.value.request_id) == 32  # a fresh id the server chose
