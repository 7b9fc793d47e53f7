"""A real Prometheus (Debian's `prometheus`) scrapes a running server on loopback, and its
HTTP API shows that time-to-first-token samples arrived."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from loraplex.client import Client
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings

pytestmark = pytest.mark.slow
PROMETHEUS = "/usr/bin/prometheus"
DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "dashboards" / \
    "loraplex.json"


def prometheus_binary() -> str:
    """Debian's prometheus; installed here when missing (the Makefile set-up does it too)."""
    found = shutil.which("prometheus") or (PROMETHEUS if Path(PROMETHEUS).exists() else None)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("prometheus is not installed and apt-get is not usable here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, env=env)
    done = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                           "prometheus"], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not Path(PROMETHEUS).exists():
        pytest.skip(f"could not install prometheus: {done.stderr[-500:]}")
    return PROMETHEUS


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(api: str, promql: str) -> list[dict]:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_ttft_samples(micro_base, tmp_path):
    binary = prometheus_binary()
    reg = Registry.open(tmp_path / "reg")
    settings = load_settings({"base": micro_base, "registry": str(tmp_path / "reg"),
                              "host": "127.0.0.1", "port": 0, "metrics_host": "127.0.0.1",
                              "metrics_port": 0, "quantization": "none", "device": "cpu"})
    with BackgroundServer(settings, registry=reg) as bg:
        client = Client(bg.target, token=reg.create_token(Identity.system(), "acme"))
        for i in range(3):
            client.generate(None, f"sample {i}", max_new_tokens=4)
        web = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: loraplex\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{bg.metrics_port}']\n")
        prom = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            api, count, deadline = f"http://127.0.0.1:{web}", 0.0, time.monotonic() + 60
            while time.monotonic() < deadline and count < 3:
                time.sleep(0.5)
                try:
                    result = query(api, "loraplex_time_to_first_token_seconds_count")
                except OSError:
                    continue  # not listening yet
                count = float(result[0]["value"][1]) if result else 0.0
            assert count >= 3, f"no TTFT samples in Prometheus after 60s (prometheus rc " \
                               f"{prom.poll()})"
            up = query(api, 'up{job="loraplex"}')
            assert up and up[0]["value"][1] == "1"
            buckets = query(api, "sum by (le) (loraplex_time_to_first_token_seconds_bucket)")
            assert any(b["metric"]["le"] == "+Inf" and float(b["value"][1]) >= 3
                       for b in buckets)
            for expr in dashboard_queries():  # every Grafana panel query is valid PromQL
                query(api, expr.replace("$__rate_interval", "1m"))
        finally:
            prom.terminate()
            try:
                prom.wait(20)
            except subprocess.TimeoutExpired:
                prom.kill()
            client.close()
    reg.close()
