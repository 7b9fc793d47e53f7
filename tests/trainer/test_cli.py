"""The typer commands as a user runs them: `loraplex train` / `loraplex eval`, and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.registry import Identity, Registry


def _cli_args(flags: dict) -> list[str]:
    args = []
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_train_then_eval_from_the_command_line(micro_base, acme_data, tmp_path, quick_flags):
    runner = CliRunner()
    y = tmp_path / "train.yaml"
    y.write_text("lr: 0.5\nmax_steps: 4\n")  # lr overridden by the flag below
    flags = quick_flags(micro_base, acme_data, tmp_path)
    del flags["max_steps"]
    res = runner.invoke(app, ["train", "--config", str(y), "--quiet", *_cli_args(flags)])
    assert res.exit_code == 0, res.output
    line = [x for x in res.stdout.splitlines() if x.startswith("acme/upper:v1 sha256:")]
    assert line, res.output
    with Registry.open(tmp_path / "registry") as reg:
        v = reg.resolve(Identity.system(), "acme/upper")
    assert v.lineage["hyperparameters"]["lr"] == 1e-3 and v.lineage["metrics"]["steps"] == 4

    res = runner.invoke(app, ["eval", "--base", str(micro_base), "--adapter", "acme/upper",
                              "--data", str(acme_data), "--registry", str(tmp_path / "registry"),
                              "--max-examples", "4", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads([x for x in res.stdout.splitlines() if x.startswith("{")][-1])
    assert report["ref"] == "acme/upper:v1" and report["digest"] == v.digest
    for side in ("base", "with_adapter"):
        assert report[side]["n"] == 4 and 0 <= report[side]["exact_match"] <= 1
    assert report["base"]["loss"] != report["with_adapter"]["loss"]
    with Registry.open(tmp_path / "registry") as reg:  # kept beside v1 for the console
        (kept,) = reg.evaluations(Identity.system(), "acme/upper")
    assert report["recorded"] and (kept.version, kept.kind) == (1, "eval")
    assert kept.metrics == {k: report["with_adapter"][k] for k in ("loss", "exact_match")}
    assert kept.data_digest.startswith("sha256:") and kept.detail["n"] == 4

    other = tmp_path / "other-base"
    from loraplex.basemodel import build_base

    build_base(other, size="micro", seed=5)
    res = runner.invoke(app, ["eval", "--base", str(other), "--adapter", "acme/upper",
                              "--data", str(acme_data), "--registry", str(tmp_path / "registry")])
    assert res.exit_code == 1 and "FAILED_PRECONDITION" in res.output
    assert "was trained on base" in res.output


def test_bad_line_is_a_clear_cli_error(micro_base, tmp_path, quick_flags):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "A"}\nnot json\n')
    res = CliRunner().invoke(app, ["train", "--quiet",
                                   *_cli_args(quick_flags(micro_base, bad, tmp_path))])
    assert res.exit_code == 1
    assert "INVALID_ARGUMENT" in res.output and "bad.jsonl:2: not valid JSON" in res.output


def test_torchrun_two_processes_gloo_and_only_rank0_publishes(micro_base, acme_data, tmp_path,
                                                              quick_flags):
    flags = quick_flags(micro_base, acme_data, tmp_path, max_steps=2, eval_steps=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "loraplex.cli", "train", "--quiet", "--json",
           *_cli_args(flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert len(results) == 1  # rank 1 trains but does not report or publish
    assert results[0]["metrics"]["world_size"] == 2
    with Registry.open(tmp_path / "registry") as reg:
        assert [v.ref for v in reg.list_versions(Identity.system(), "acme/upper")] == \
            ["acme/upper:v1"]


def test_train_dora_publishes_a_dora_adapter_the_runtime_serves(micro_base, acme_data, tmp_path,
                                                                 quick_flags):
    """`--dora`: peft trains a magnitude per output feature; the registry keeps it and the
    runtime serves it with its own per-feature factor (not plain B·A)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraplex.runtime.lora.layers import inject_lora

    flags = quick_flags(micro_base, acme_data, tmp_path, max_steps=2, eval_steps=2, lr=1e-2)
    res = CliRunner().invoke(app, ["train", "--dora", "--quiet", *_cli_args(flags)])
    assert res.exit_code == 0, res.output
    with Registry.open(tmp_path / "registry") as reg:
        v = reg.resolve(Identity.system(), "acme/upper")
        loaded = reg.load_adapter(v)
    assert loaded.config["use_dora"] is True and v.lineage["hyperparameters"]["dora"] is True
    mags = [k for k in loaded.tensors if k.endswith(".lora_magnitude_vector")]
    assert mags and len(mags) == len(loaded.pairs())
    model = AutoModelForCausalLM.from_pretrained(micro_base, dtype=torch.float32).eval()
    inj = inject_lora(model, None, max_slots=1, max_rank=v.rank)
    gains = inj.dora_gains(loaded.tensors, v.rank, v.alpha, v.use_rslora)
    assert max(float(g.abs().max()) for g in gains.values()) > 1e-5  # the magnitude learned
