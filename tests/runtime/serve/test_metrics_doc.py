"""docs/metrics.md is the one metrics reference: every metric family a server serves on
`/metrics` is documented there with its labels, and every metric documented there is served.

The registry is the one `loraplex serve` builds (`ServerMetrics(top_k=settings.metrics_top_k)`,
bound to an engine's stats and resident list as the server binds it), read back over HTTP
from its own `/metrics` port, so the router collector and the process collector count too.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace as NS

from prometheus_client.parser import text_string_to_metric_families

from loraplex.runtime.serve.metrics import ServerMetrics, scrape
from loraplex.runtime.serve.settings import load_settings

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "metrics.md"
NAME = re.compile(r"^[A-Za-z_:][A-Za-z0-9_:]*$")


def documented() -> dict[str, set[str]]:
    """metric name -> label names, from every table row of docs/metrics.md whose first cell
    names a metric in backticks."""
    out: dict[str, set[str]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        labels = set(re.findall(r"`([^`]+)`", cells[1]))
        for name in re.findall(r"`([^`]+)`", cells[0]):
            if NAME.match(name):
                out[name] = labels
    return out


def _stats() -> NS:
    return NS(slots_used=1, slots_total=4, host_bytes=1024, kv_reserved_bytes=4096,
              kv_used_bytes=2048, kv_limit_bytes=8192, kv_rows_used=1, kv_rows_total=8,
              prefix_lookups=2, prefix_hits=1, prefix_hit_tokens=16, running=1, waiting=1)


def _exercise(m: ServerMetrics) -> None:
    """One event through every hook, so each labelled series has a sample to show its labels."""
    adapter = NS(tenant="acme", key="acme/router", ref="acme/router:v1")
    m.on_request_queued(NS(request_id="r1", tenant="acme", adapter="acme/router@prod"))
    m.on_request_queued(NS(request_id="r2", tenant="acme", adapter=None))
    m.on_admitted(0.01)
    m.on_first_token(0.05)
    m.on_token(0.02)
    m.on_finished(NS(request_id="r1", finish_reason="stop", adapter=adapter,
                     usage=NS(prompt_tokens=3, completion_tokens=5), timings=NS(total_s=0.2)))
    m.on_failed("r2", "DATA_LOSS")
    m.on_request_rejected("globex", "globex/x@prod", "NOT_FOUND")
    m.on_adapter_load("registry", 0.04)
    m.on_adapter_load("host", 0.002)
    for event in ("hit", "miss", "evict"):
        m.on_cache(event, "device")
    m.on_grammar_compile(0.003)
    m.on_grammar_cache(True)
    m.on_grammar_cache(False)
    m.on_step(2, 1, 1)
    m.observe_rpc("/loraplex.v1.InferenceService/Generate", "OK", 0.3)


def served() -> dict[str, tuple[str, set[str]]]:
    """metric name as a scraper sees it -> (type, label names), from a live `/metrics`."""
    m = ServerMetrics(top_k=load_settings().metrics_top_k)
    m.bind_engine(_stats, lambda: [NS(ref="acme/router:v1", slot=1, active_sequences=1,
                                      on_host=True)])
    _exercise(m)
    port = m.serve_http(0, "127.0.0.1")
    try:
        text = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        m.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    out = {}
    for family in families.values():
        parent = families.get(family.name.removesuffix("_created"))
        if family.name.endswith("_created") and parent is not None and parent.type in (
                "counter", "histogram"):
            continue  # prometheus_client's creation timestamp of that counter or histogram
        # the parser names a counter's family without `_total`; a scraper queries it with it
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        out[name] = (family.type, labels)
    return out


def test_every_served_metric_is_documented_and_every_documented_metric_is_served() -> None:
    doc, live = documented(), served()
    assert {"loraplex_requests_total", "loraplex_time_to_first_token_seconds",
            "vllm:lora_requests_info", "process_cpu_seconds_total"} <= live.keys()
    undocumented = sorted(live.keys() - doc.keys())
    assert not undocumented, f"served but missing from docs/metrics.md: {undocumented}"
    stale = sorted(doc.keys() - live.keys())
    assert not stale, f"documented in docs/metrics.md but not served: {stale}"
    assert "`<name>_created`" in DOC.read_text(), "the `_created` series are not explained"


def test_documented_labels_are_the_served_labels() -> None:
    doc, live = documented(), served()
    wrong = {name: (sorted(doc[name]), sorted(labels))
             for name, (_type, labels) in live.items() if labels and doc.get(name) != labels}
    assert not wrong, f"labels in docs/metrics.md (doc, served) differ: {wrong}"
    unlabelled_in_doc = {name for name, labels in doc.items() if labels
                         and name in live and not live[name][1]}
    assert not unlabelled_in_doc, f"no sample shows these documented labels: {unlabelled_in_doc}"


def test_each_metric_sits_in_the_table_of_its_type() -> None:
    """Histograms under Latency, counters under Traffic, gauges under State (vLLM's and the
    process collector's keep their own sections)."""
    section, where = "", {}
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:]
        m = re.match(r"\|\s*`([^`]+)`", line)
        if m:
            where[m.group(1)] = section
    expected = {"histogram": "Latency (histograms)", "counter": "Traffic (counters)",
                "gauge": "State (gauges)"}
    misplaced = {name: (where.get(name), expected[kind]) for name, (kind, _l) in served().items()
                 if name.startswith("loraplex_") and where.get(name) != expected[kind]}
    assert not misplaced, f"metrics in the wrong table (is, should be): {misplaced}"
