"""`loraplex train` with no hyper-parameter flags, end to end on the tiny base: the recipe is
chosen, the learning rate probed, the best checkpoint by validation loss published, and all
of it recorded in the lineage and shown to the user."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.registry import Identity, Registry


@pytest.fixture(scope="module")
def auto_run(base_factory, acme_data, tmp_path_factory):
    """One `loraplex train` from the command line with what a new user types (plus a short
    run: `--epochs`)."""
    import torch

    tmp = tmp_path_factory.mktemp("auto")
    base = base_factory("tiny", "llama")
    # One thread: the tiny base's matmuls are too small to share, and on a busy 2-core
    # machine two threads wait on each other (5 s a step against 0.2 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(app, [
            "train", "--base", str(base), "--data", str(acme_data), "--name", "acme/auto",
            "--quantization", "none", "--registry", str(tmp / "registry"),
            "--output-dir", str(tmp / "run"), "--max-seq-len", "64",
            "--eval-max-new-tokens", "8",
            # the one hyper-parameter given: 12 epochs (48 steps) keep the test short; the
            # automatic 40 (160 steps) would take minutes on a busy machine
            "--epochs", "12"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    with Registry.open(tmp / "registry") as reg:
        v = reg.resolve(Identity.system(), "acme/auto")
        adapter = reg.load_adapter(v)
    return res, v, adapter, tmp / "run"


def test_the_recipe_is_chosen_and_recorded_with_its_reasons(auto_run):
    res, v, _, run = auto_run
    recipe = v.lineage["recipe"]
    hp = v.lineage["hyperparameters"]
    assert recipe["given"] == ["epochs"] and recipe["reasons"]["epochs"] == "given"
    for k in ("lr", "batch_size", "r", "alpha", "dropout", "eval_steps", "patience"):
        assert recipe["values"][k] == hp[k], k  # what was chosen is what trained
        assert recipe["reasons"][k] and recipe["reasons"][k] != "given", k
    assert hp["r"] == 16 and v.rank == 16  # the adapter itself has the chosen rank
    probe = recipe["probe"]
    assert len(probe["candidates"]) >= 2 and probe["chosen"] == hp["lr"]
    assert set(json.loads(json.dumps(probe["val_loss"]))) and probe["steps"] >= 3
    assert v.lineage["dataset"]["val_examples"] == 8  # auto split: 8 of 40 rows
    assert json.loads((run / "recipe.json").read_text())["recipe"]["values"]["r"] == 16


def test_the_best_checkpoint_by_validation_loss_is_the_one_published(auto_run):
    _, v, adapter, run = auto_run
    curve = v.lineage["curve"]
    vals = [(c["step"], c["val_loss"]) for c in curve if "val_loss" in c]
    assert len(vals) >= 3 and any("train_loss" in c for c in curve)
    best_step, best_loss = min(vals, key=lambda sv: sv[1])
    kept = v.lineage["checkpoint"]
    assert kept["step"] == best_step and f"{best_loss:.4f}" in kept["why"]
    assert v.lineage["metrics"]["val_loss"] == pytest.approx(best_loss, abs=1e-4)
    saved = load_file(run / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    published = {k.removeprefix("base_model.model."): t for k, t in adapter.tensors.items()}
    saved = {k.removeprefix("base_model.model."): t for k, t in saved.items()}
    assert saved.keys() == published.keys() and saved
    for k, t in saved.items():  # byte for byte the best checkpoint's weights
        assert t.equal(published[k]), k


def test_the_user_sees_the_recipe_curve_kept_checkpoint_and_how_to_serve(auto_run):
    res, v, _, run = auto_run
    out = res.stdout
    assert "recipe: epochs 12" in out and "(auto: batch_size, lr, r, alpha" in out
    # the tiny base: 3e-3 (the rule's), then 1e-3 unless 3e-3 halved the loss
    assert "lr probe: probe: 2 of 2 rates" in out or "1.0e-03 not tried" in out
    assert f"kept: step {v.lineage['checkpoint']['step']}" in out
    png = run / "curve.png"
    assert f"curve: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loraplex serve --base " in out and "loraplex generate --adapter acme/auto:v1" in out


def test_explicit_flags_win_and_skip_the_probe(micro_base, acme_data, tmp_path, quick_flags):
    from loraplex.trainer.cli import run_train

    out = run_train(quick_flags(micro_base, acme_data, tmp_path, r=4, lr=2e-3, epochs=2.0,
                                max_steps=-1), None, progress=False)
    recipe = out["recipe"]
    assert recipe["values"]["r"] == 4 and recipe["values"]["lr"] == 2e-3
    assert recipe["values"]["epochs"] == 2.0 and recipe["values"]["alpha"] == 8.0
    assert {"r", "lr", "epochs", "batch_size", "eval_steps"} <= set(recipe["given"])
    assert out["probe"] is None
    with Registry.open(tmp_path / "registry") as reg:
        v = reg.resolve(Identity.system(), out["ref"])
    assert v.rank == 4 and v.lineage["hyperparameters"]["lr"] == 2e-3
    assert v.lineage["recipe"]["reasons"]["lr"] == "given"


def test_a_budget_too_small_for_the_probe_keeps_the_rules_rate(base_factory, acme_data, tmp_path):
    """The probe never runs past its share of `--budget`: when two timed steps show that
    three steps per candidate rate do not fit, it stops, keeps the rule's rate and says so."""
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    cfg = TrainConfig(base=str(base_factory("micro", "llama")), data=str(acme_data),
                      name="acme/budget", output_dir=str(tmp_path / "run"), publish=False,
                      quantization="none", max_seq_len=64, eval_max_new_tokens=4,
                      budget="0.01s")  # no CPU runs 3 steps per rate in a quarter of it
    res = train(cfg, progress=False)
    probe = res.report["probe"]
    assert probe["skipped"] and probe["steps"] == 0 and probe["chosen"] == probe["prior"]
    assert "no learning-rate probe: its share of the budget" in probe["reason"]
    assert res.report["recipe"]["reasons"]["lr"] == probe["reason"]  # what the user is shown
    assert res.metrics["steps"] >= 1 and (res.adapter_dir / "adapter_model.safetensors").exists()


def test_the_probes_winner_continues_and_its_steps_count_toward_the_run(micro_base, acme_data,
                                                                        tmp_path):
    """With the run's length left to the recipe, the probe's winning adapter is where the run
    starts, and the probe's steps come off the planned ones (not trained again)."""
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    cfg = TrainConfig(base=str(micro_base), data=str(acme_data), name="acme/carry",
                      output_dir=str(tmp_path / "run"), publish=False, quantization="none",
                      max_seq_len=64, eval_max_new_tokens=4, patience=0)
    res = train(cfg, progress=False)
    probe, recipe = res.report["probe"], res.report["recipe"]
    assert probe["continued"] == probe["steps"] >= 3
    note = next(n for n in recipe["notes"] if n.startswith("the probe's winner continues"))
    planned = int(note.split(" planned")[0].rsplit(" ", 1)[1])
    steps_per_epoch = -(-32 // 8)  # 40 rows, 8 held out for validation; batch 8
    assert recipe["values"]["epochs"] == pytest.approx((planned - probe["steps"]) / steps_per_epoch)
    assert res.metrics["steps"] == planned - probe["steps"]  # no early stop (patience 0)


def test_a_run_length_the_user_gave_is_trained_in_full_after_the_probe(micro_base, acme_data,
                                                                       tmp_path):
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    cfg = TrainConfig(base=str(micro_base), data=str(acme_data), name="acme/given",
                      output_dir=str(tmp_path / "run"), publish=False, quantization="none",
                      max_seq_len=64, eval_max_new_tokens=4, patience=0, epochs=12.0)
    res = train(cfg, progress=False)
    assert res.report["probe"]["steps"] >= 3 and res.report["probe"]["continued"] == 0
    assert res.report["recipe"]["values"]["epochs"] == 12.0 and res.metrics["steps"] == 48


def test_the_run_goes_on_with_the_probe_winners_optimizer_state(micro_base, acme_data, tmp_path):
    """The run's optimizer is the probe winner's: a checkpoint's Adam state has counted the
    probe's steps as well as the run's own (a fresh optimizer would count the run's only)."""
    import torch

    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    cfg = TrainConfig(base=str(micro_base), data=str(acme_data), name="acme/state",
                      output_dir=str(tmp_path / "run"), publish=False, quantization="none",
                      max_seq_len=64, eval_max_new_tokens=4, patience=0)
    res = train(cfg, progress=False)
    done = res.report["probe"]["continued"]
    assert done >= 3
    last = max((tmp_path / "run").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = torch.load(last / "optimizer.pt", weights_only=False)["state"]
    assert {int(s["step"]) for s in state.values()} == {int(last.name.split("-")[1]) + done}


def test_a_probe_winner_that_has_converged_is_published_without_more_steps(
        micro_base, acme_data, tmp_path, monkeypatch):
    """With a least gain no loss can stay above (the answer-gain constant raised), the first
    candidate (the highest rate) converges: the probe ends there and its adapter is the run."""
    from loraplex.trainer import recipe as recipe_mod
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    monkeypatch.setattr(recipe_mod, "ANSWER_GAIN", 1e3)
    cfg = TrainConfig(base=str(micro_base), data=str(acme_data), name="acme/converged",
                      output_dir=str(tmp_path / "run"), publish=False, quantization="none",
                      max_seq_len=64, eval_max_new_tokens=4)
    res = train(cfg, progress=False)
    probe = res.report["probe"]
    assert probe["converged"] and list(probe["val_loss"]) == [max(probe["candidates"])]
    assert probe["chosen"] == max(probe["candidates"]) and "nothing is left" in probe["reason"]
    assert res.metrics["steps"] == probe["steps"] == res.report["checkpoint"]["step"]
    assert res.metrics["val_loss"] == pytest.approx(probe["val_loss"][probe["chosen"]])
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # no Trainer run
    assert any(n.startswith("the probe's winner is the run") for n in res.report["recipe"]["notes"])
    assert (res.adapter_dir / "adapter_model.safetensors").exists() and res.curve_png
