"""The vLLM-named metrics LoRA-aware routers scrape, read from a live server's /metrics."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.fingerprint import fingerprint_base
from loraplex.registry import Identity, Registry
from loraplex.runtime.api.types import SamplingParams
from loraplex.runtime.serve.metrics import scrape
from loraplex.runtime.serve.router_metrics import adapter_key, snapshot
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from tests.registry.conftest import adapter_files, write_adapter


def _stats(**kw):
    base = dict(slots_total=4, running=0, waiting=0, kv_rows_used=0, kv_rows_total=8)
    return SimpleNamespace(**{**base, **kw})


def _res(ref, slot, active):
    return SimpleNamespace(ref=ref, slot=slot, active_sequences=active)


@pytest.mark.parametrize(("ref", "key"), [
    ("acme/bot:v3", "acme/bot"), ("acme/bot@prod", "acme/bot"), ("acme/bot", "acme/bot"),
    ("sha256:" + "c" * 64, "sha256:" + "c" * 64)])
def test_adapter_key(ref, key) -> None:
    assert adapter_key(ref) == key


def test_snapshot_running_are_busy_slots_waiting_are_queued_others() -> None:
    snap = snapshot(
        _stats(running=3, waiting=2, kv_rows_used=3),
        [_res("acme/a:v1", 1, 2), _res("acme/b:v2", 2, 0), _res("acme/c:v1", None, 0)],
        ["acme/a@prod", "acme/a:v1", "acme/c@prod", "", "globex/z"])
    assert snap.running_adapters == ("acme/a",)  # b holds a slot but runs nothing
    assert snap.waiting_adapters == ("acme/c", "globex/z")  # a already runs; "" is the base
    assert (snap.max_lora, snap.running, snap.waiting, snap.kv_usage) == (4, 3, 2, 3 / 8)
    # once the engine has measured its KV: bytes used over the pool's limit
    assert snapshot(_stats(kv_used_bytes=300, kv_limit_bytes=1200), [], []).kv_usage == 0.25


def _samples(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)
            if f.name.startswith("vllm:")}


def test_live_server_reports_running_and_waiting_adapters(micro_base, tmp_path) -> None:
    reg = Registry.open(tmp_path / "reg")
    system = Identity.system()
    reg.register_base(system, micro_base)
    fp = fingerprint_base(micro_base)
    for seed, name in enumerate(("acme/a", "acme/b")):
        d = write_adapter(tmp_path / name.replace("/", "_"), *adapter_files(
            fp.linear_shapes, seed=seed, base_name=str(micro_base)))
        reg.push(system, d, name, base=fp)
    settings = load_settings({
        "base": micro_base, "registry": str(tmp_path / "reg"), "port": 0, "host": "127.0.0.1",
        "metrics_port": 0, "metrics_host": "127.0.0.1", "quantization": "none",
        "device": "cpu", "max_slots": 1, "max_batch": 4,
        "engine": {"compute_dtype": "float32"}})
    with BackgroundServer(settings, registry=reg) as bg:
        url = f"http://127.0.0.1:{bg.metrics_port}/metrics"
        idle = _samples(scrape(url))
        (info,) = idle["vllm:lora_requests_info"]
        assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "",
                               "max_lora": "1"}
        assert abs(info.value - time.time()) < 60  # a timestamp: routers take the newest
        engine = bg.server.engine
        streams = [engine.submit(engine.admit(
            f"r-{name}", Identity("acme"), name, prompt="hello",
            sampling=SamplingParams(max_new_tokens=1000))) for name in ("acme/a", "acme/b")]
        try:
            deadline = time.monotonic() + 30
            while True:  # one slot: a runs, b waits for the slot a holds
                s = _samples(scrape(url))
                labels = s["vllm:lora_requests_info"][0].labels
                if labels["running_lora_adapters"] and labels["waiting_lora_adapters"]:
                    break
                assert time.monotonic() < deadline, labels
                time.sleep(0.05)
            assert {labels["running_lora_adapters"], labels["waiting_lora_adapters"]} == \
                {"acme/a", "acme/b"}
            assert s["vllm:num_requests_running"][0].value == 1
            assert s["vllm:num_requests_waiting"][0].value == 1
            # one of 4 rows runs, not yet at max_seq_len: above 0, at most a quarter
            assert 0 < s["vllm:kv_cache_usage_perc"][0].value <= 1 / 4
            assert 0 < s["vllm:gpu_cache_usage_perc"][0].value <= 1 / 4
            kv = {f.name: f.samples[0].value for f in text_string_to_metric_families(
                scrape(url)) if f.name.startswith("loraplex_kv_")}
            assert 0 < kv["loraplex_kv_used_bytes"] <= kv["loraplex_kv_reserved_bytes"]
        finally:
            for st in streams:
                st.cancel()
        for st in streams:
            st.wait(30)
        time.sleep(0.1)
        after = _samples(scrape(url))["vllm:lora_requests_info"][0].labels
        assert after["waiting_lora_adapters"] == "" and after["running_lora_adapters"] == ""
