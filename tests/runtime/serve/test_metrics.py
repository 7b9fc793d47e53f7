"""ServerMetrics: engine hooks land in the documented series, labels stay bounded, and the
quantile helper agrees with Prometheus' histogram_quantile."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace as NS

from prometheus_client import generate_latest

from loraplex.runtime.serve.metrics import (
    BoundedLabel,
    ServerMetrics,
    histogram_buckets,
    histogram_quantile,
    scrape,
)

REPO = Path(__file__).resolve().parents[3]
METRICS_MD = REPO / "docs" / "metrics.md"


def _request(rid, tenant, adapter=None):
    return NS(request_id=rid, tenant=tenant, adapter=adapter)


def _result(rid, reason="stop", tenant="acme", prompt=3, completion=5, total=0.2):
    adapter = NS(tenant=tenant, key=f"{tenant}/support") if tenant else None
    return NS(request_id=rid, finish_reason=reason, adapter=adapter,
              usage=NS(prompt_tokens=prompt, completion_tokens=completion),
              timings=NS(total_s=total))


def _value(m: ServerMetrics, name: str, **labels) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_engine_hooks_feed_the_documented_series():
    m = ServerMetrics()
    m.on_request_queued(_request("r1", "acme", "acme/support@prod"))
    m.on_admitted(0.01)
    m.on_first_token(0.05)
    for _ in range(4):
        m.on_token(0.002)
    m.on_finished(_result("r1"))
    m.on_request_rejected("acme", "acme/support", "RESOURCE_EXHAUSTED")
    m.on_cache("hit", "device")
    m.on_cache("miss", "host")
    m.on_cache("evict", "device")
    m.on_adapter_load("registry", 0.03)
    m.on_step(batch_size=7, running=5, waiting=2)
    m.observe_rpc("/loraplex.v1.InferenceService/Generate", "OK", 0.3)

    assert _value(m, "loraplex_time_to_first_token_seconds_count") == 1
    assert _value(m, "loraplex_inter_token_latency_seconds_count") == 4
    assert _value(m, "loraplex_queue_time_seconds_count") == 1
    assert _value(m, "loraplex_request_duration_seconds_count", outcome="stop") == 1
    assert _value(m, "loraplex_requests_total", outcome="stop", tenant="acme",
                  adapter="acme/support") == 1
    assert _value(m, "loraplex_requests_total", outcome="resource_exhausted", tenant="acme",
                  adapter="acme/support") == 1
    assert _value(m, "loraplex_generated_tokens_total", tenant="acme") == 5
    assert _value(m, "loraplex_prompt_tokens_total", tenant="acme") == 3
    assert _value(m, "loraplex_adapter_cache_hits_total", tier="device") == 1
    assert _value(m, "loraplex_adapter_cache_misses_total", tier="host") == 1
    assert _value(m, "loraplex_adapter_cache_evictions_total", tier="device") == 1
    assert _value(m, "loraplex_adapter_load_seconds_count", tier="registry") == 1
    assert (_value(m, "loraplex_batch_size"), _value(m, "loraplex_running_requests"),
            _value(m, "loraplex_waiting_requests")) == (7, 5, 2)
    assert _value(m, "loraplex_grpc_requests_total",
                  method="/loraplex.v1.InferenceService/Generate", code="OK") == 1


def test_tenant_and_adapter_labels_are_bounded():
    m = ServerMetrics(top_k=3)
    for i in range(10):
        m.on_request_queued(_request(f"r{i}", f"t{i}"))
        m.on_finished(_result(f"r{i}", tenant=f"t{i}"))
    text = generate_latest(m.registry).decode()
    tenants = set(re.findall(r'loraplex_generated_tokens_total\{tenant="([^"]+)"', text))
    assert tenants == {"t0", "t1", "t2", "other"}
    assert _value(m, "loraplex_generated_tokens_total", tenant="other") == 7 * 5
    adapters = set(re.findall(r'adapter="([^"]+)"', text))
    assert adapters == {"t0/support", "t1/support", "t2/support", "other"}


def _series_after(n_adapters: int) -> int:
    """Series on /metrics after traffic over `n_adapters` adapters of 8 tenants, with all
    of them held on the host and 8 in device slots."""
    m = ServerMetrics(top_k=20)
    stats = NS(slots_used=8, slots_total=8, host_bytes=n_adapters << 20,
               host_adapters=n_adapters, device_bytes=8 << 20, host_loading_bytes=0,
               host_limit_bytes=1 << 30, host_peak_bytes=n_adapters << 20, loads_queued=3,
               kv_reserved_bytes=0, kv_used_bytes=0, kv_limit_bytes=1, kv_rows_used=0,
               kv_rows_total=8, running=8, waiting=n_adapters, prefix_lookups=0,
               prefix_hits=0, prefix_hit_tokens=0)
    held = [NS(ref=f"t{i % 8}/a{i}:v1", slot=i + 1 if i < 8 else None, on_host=True,
               active_sequences=1 if i < 8 else 0) for i in range(n_adapters)]
    m.bind_engine(lambda: stats, lambda: held[:stats.slots_total])  # as the server binds it
    for i in range(n_adapters):
        m.on_request_queued(_request(f"q{i}", f"t{i % 8}", f"t{i % 8}/a{i}@prod"))
    for i in range(n_adapters):
        m.on_adapter_load("registry", 0.05)
        m.on_adapter_load("host", 0.002)
        m.on_cache("miss", "host")
        m.on_cache("evict", "host")
        m.on_finished(NS(request_id=f"r{i}", finish_reason="stop",
                         adapter=NS(tenant=f"t{i % 8}", key=f"t{i % 8}/a{i}"),
                         usage=NS(prompt_tokens=3, completion_tokens=5),
                         timings=NS(total_s=0.2)))
    text = generate_latest(m.registry).decode()
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_a_thousand_adapters_serve_as_many_series_as_a_few():
    """Residency, bytes and load latency are per tier and the adapter label is capped, so
    1,000 adapters serve as many series as 30."""
    assert _series_after(1000) == _series_after(30)
    assert _value_of_tiers(1000) == {"device": 8 << 20, "host": 1000 << 20, "loading": 0,
                                     "host_limit": 1 << 30, "host_peak": 1000 << 20}


def _value_of_tiers(n: int) -> dict[str, float]:
    m = ServerMetrics()
    m.bind_engine(lambda: NS(device_bytes=8 << 20, host_bytes=n << 20, host_loading_bytes=0,
                             host_limit_bytes=1 << 30, host_peak_bytes=n << 20))
    return {t: _value(m, "loraplex_adapter_bytes", tier=t)
            for t in ("device", "host", "loading", "host_limit", "host_peak")}


def test_bounded_label_keeps_first_k():
    label = BoundedLabel(2)
    assert [label(v) for v in "abcab"] == ["a", "b", "other", "a", "b"]


def test_servers_do_not_share_registries():
    a, b = ServerMetrics(), ServerMetrics()
    a.on_first_token(0.1)
    assert _value(a, "loraplex_time_to_first_token_seconds_count") == 1
    assert _value(b, "loraplex_time_to_first_token_seconds_count") == 0


def test_histogram_quantile_matches_prometheus_interpolation():
    m = ServerMetrics()
    for v in [0.004] * 50 + [0.04] * 49 + [4.0]:
        m.on_first_token(v)
    buckets = histogram_buckets(generate_latest(m.registry).decode(),
                                "loraplex_time_to_first_token_seconds")
    assert buckets[-1] == (float("inf"), 100.0)
    p50 = histogram_quantile(buckets, 0.5)
    assert 0 < p50 <= 0.005  # 50th of 100 samples lies in the first bucket (0, 0.005]
    assert 0.025 < histogram_quantile(buckets, 0.99) <= 0.05
    assert histogram_quantile([], 0.5) is None


def test_metrics_endpoint_serves_text_on_its_own_port():
    m = ServerMetrics()
    port = m.serve_http(0, "127.0.0.1")
    try:
        m.on_first_token(0.2)
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert "loraplex_time_to_first_token_seconds_count 1.0" in text
    finally:
        m.close()


def test_dashboard_and_prometheus_config_use_real_metrics():
    import json
    import shutil
    import subprocess

    doc = METRICS_MD.read_text()
    dashboard = (REPO / "deploy" / "grafana" / "dashboards" / "loraplex.json").read_text()
    panels = json.loads(dashboard)["panels"]
    assert {"Time to first token (p50 / p99)", "Inter-token latency (p50 / p99)"} <= {
        p["title"] for p in panels}
    for name in set(re.findall(r"loraplex_[a-z_]+", dashboard)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert f"`{base}`" in doc, f"dashboard uses undocumented metric {name}"
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run([promtool, "check", "config", str(REPO / "deploy" /
                                                              "prometheus.yml")],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_refused_refs_do_not_take_label_places():
    m = ServerMetrics(top_k=2)
    for i in range(5):
        m.on_request_rejected("acme", f"acme/typo{i}", "NOT_FOUND")
    m.on_request_queued(_request("r1", "acme", "acme/support"))
    m.on_finished(_result("r1"))
    assert _value(m, "loraplex_requests_total", outcome="not_found", tenant="acme",
                  adapter="other") == 5
    assert _value(m, "loraplex_requests_total", outcome="stop", tenant="acme",
                  adapter="acme/support") == 1
