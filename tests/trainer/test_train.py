"""End-to-end `loraplex train` on micro bases: determinism, resume, publishing, gates."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from loraplex import compute
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity, Registry
from loraplex.trainer.cli import run_train


class StopAtStep(TrainerCallback):
    """Raises at a given global step: a run killed part-way."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise KeyboardInterrupt(f"simulated kill at step {state.global_step}")


def test_same_seed_data_and_config_give_the_same_digest(micro_base, acme_data, tmp_path, quick_flags):
    a = run_train(quick_flags(micro_base, acme_data, tmp_path / "a"), None, progress=False)
    b = run_train(quick_flags(micro_base, acme_data, tmp_path / "b"), None, progress=False)
    c = run_train(quick_flags(micro_base, acme_data, tmp_path / "c", seed=1), None,
                  progress=False)
    assert a["digest"] == b["digest"] != c["digest"]
    assert a["ref"] == "acme/upper:v1"


def test_resume_after_a_kill_ends_at_the_uninterrupted_digest(micro_base, acme_data, tmp_path, quick_flags):
    whole = run_train(quick_flags(micro_base, acme_data, tmp_path / "whole"), None,
                      progress=False)
    killed = quick_flags(micro_base, acme_data, tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):  # killed at step 3: checkpoint-2 is on disk
        run_train(killed, None, progress=False, extra_callbacks=[StopAtStep(3)])
    run_dir = tmp_path / "killed" / "run"
    assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "adapter").exists()
    resumed = run_train({**killed, "resume": True}, None, progress=False)
    assert resumed["metrics"]["resumed_from_step"] == 2
    assert resumed["digest"] == whole["digest"]


def test_lineage_metrics_file_and_best_weights(micro_base, acme_data, tmp_path, quick_flags,
                                               read_metrics, monkeypatch):
    monkeypatch.delenv(compute.ENV, raising=False)  # the suite's fp32 default off: `auto`
    out = run_train(quick_flags(micro_base, acme_data, tmp_path), None, progress=False)
    with Registry.open(tmp_path / "registry") as reg:
        v = reg.resolve(Identity.system(), out["ref"])
    lin = v.lineage
    assert lin["dataset"]["examples"] == 40 and lin["dataset"]["digest"].startswith("sha256:")
    assert lin["dataset"]["val_examples"] == 8 and lin["seed"] == 0
    assert lin["dataset"]["format"] == "prompt_completion"  # trained on the prompt as written
    assert lin["base"]["digest"] == v.base.digest
    assert lin["hyperparameters"]["lr"] == 1e-3 and lin["hyperparameters"]["r"] == 16  # auto
    for k in ("train_loss", "val_loss", "val_exact_match", "wall_s", "tokens_per_s"):
        assert lin["metrics"][k] is not None, k
    assert {"torch", "transformers", "peft"} <= set(lin["libraries"])
    # the dtype it trained in and why: `auto`, decided for this machine
    assert lin["compute"]["requested"] == "auto" and lin["compute"]["source"] == "auto"
    assert lin["compute"]["dtype"] == compute.choose("auto", "cpu").dtype
    assert lin["compute"]["reason"] and out["compute"] == lin["compute"]
    recs = read_metrics(tmp_path / "run")
    assert any("loss" in r and "learning_rate" in r and "tokens_per_s" in r for r in recs)
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert out["metrics"]["val_loss"] == pytest.approx(min(evals))  # the best is published


def test_malformed_data_stops_before_training_and_publishes_nothing(micro_base, acme_data,
                                                                    tmp_path, quick_flags):
    bad = tmp_path / "bad.jsonl"
    lines = acme_data.read_text().splitlines()
    lines[6] = '{"prompt": "oops"}'
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument, match=r"bad.jsonl:7: missing field"):
        run_train(quick_flags(micro_base, bad, tmp_path), None, progress=False)
    assert not (tmp_path / "run").exists()
    with Registry.open(tmp_path / "registry") as reg:
        assert reg.list_adapters(Identity.system())[0] == []


def test_promotion_gate(micro_base, acme_data, tmp_path, quick_flags):
    first = run_train(quick_flags(micro_base, acme_data, tmp_path, promote="prod"), None,
                      progress=False)
    assert first["promoted"] and "does not exist yet" in first["gate"]["reason"]
    # an impossible explicit gate: published, alias left where it was, reason given
    second = run_train(quick_flags(micro_base, acme_data, tmp_path, seed=1, promote="prod",
                                   gate="val_loss<=0.0001"), None, progress=False)
    assert second["ref"] == "acme/upper:v2" and not second["promoted"]
    assert "fails val_loss<=0.0001" in second["gate"]["reason"]
    # default gate: more training on the same data lowers val loss -> promoted over v1
    third = run_train(quick_flags(micro_base, acme_data, tmp_path, max_steps=12, lr=3e-3,
                                  promote="prod"), None, progress=False)
    assert third["promoted"], third["gate"]["reason"]
    assert "val_loss" in third["gate"]["reason"] and "acme/upper:v1" in third["gate"]["reason"]
    with Registry.open(tmp_path / "registry") as reg:
        assert reg.aliases(Identity.system(), "acme/upper") == {"prod": 3}


@pytest.mark.parametrize("arch, expected", [
    ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
])
def test_three_architectures_train_and_open_with_plain_peft(base_factory, acme_data, tmp_path,
                                                            quick_flags, arch, expected):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = base_factory("micro", arch)
    out = run_train(quick_flags(base, acme_data, tmp_path, max_steps=2, val_fraction=0.1),
                    None, progress=False)
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == expected
    dest = tmp_path / "pulled"
    with Registry.open(tmp_path / "registry") as reg:
        reg.pull(Identity.system(), out["ref"], dest)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(dest))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        with_adapter = model(ids).logits
        with model.disable_adapter():
            alone = model(ids).logits
    assert not torch.allclose(with_adapter, alone)  # the trained B matrices are live


def test_nf4_qlora_trains_and_publishes(micro_base, acme_data, tmp_path, quick_flags):
    out = run_train(quick_flags(micro_base, acme_data, tmp_path, quantization="nf4",
                                max_steps=2), None, progress=False)
    with Registry.open(tmp_path / "registry") as reg:
        v = reg.resolve(Identity.system(), out["ref"])
    assert v.dtype == "float32" and v.lineage["hyperparameters"]["quantization"] == "nf4"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_compute_dtype_trains_here_and_the_lineage_says_which(micro_base, acme_data, tmp_path,
                                                                   quick_flags, dtype):
    out = run_train(quick_flags(micro_base, acme_data, tmp_path, compute_dtype=dtype,
                                max_steps=2, val_fraction=0.0), None, progress=False)
    assert out["metrics"]["steps"] == 2 and out["metrics"]["train_loss"] > 0
    with Registry.open(tmp_path / "registry") as reg:
        lin = reg.resolve(Identity.system(), out["ref"]).lineage
    assert lin["compute"]["dtype"] == dtype and lin["compute"]["source"] == "setting"
    assert lin["hyperparameters"]["compute_dtype"] == dtype
