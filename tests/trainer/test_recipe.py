"""The automatic recipe (`trainer/recipe.py`): literal cases from dataset and base sizes."""

from __future__ import annotations

import pytest

from loraplex.errors import InvalidArgument
from loraplex.trainer.recipe import (
    BaseStats,
    Compute,
    DataStats,
    choose,
    converged,
    eval_every,
    fit_budget,
    needs_lower,
    parse_budget,
    pick_probe,
    probe_candidates,
    validation_rows,
)

SMOLLM2 = BaseStats(params=134_515_008, architecture="llama", hidden=576, layers=30)
TINY = BaseStats(params=1_700_000, architecture="llama", hidden=192, layers=4)
SEVEN_B = BaseStats(params=6_738_000_000, architecture="llama", hidden=4096, layers=32)
CPU = Compute(device="cpu", threads=2)


def rows(n: int) -> DataStats:
    return DataStats(rows=n, mean_tokens=60.0, max_tokens=120)


def test_issue_case_small_chat_data_on_smollm2_gets_more_steps_and_a_higher_lr():
    # 270 rows minus the validation split: the case QLoRA's defaults left at 18% exact-match
    r = choose(rows(243), SMOLLM2, CPU)
    v = r.values
    assert v["lr"] == 1e-3 and v["r"] == 16 and v["alpha"] == 32.0 and v["dropout"] == 0.0
    assert v["batch_size"] == 8
    steps = v["epochs"] * -(-243 // 8)
    assert v["epochs"] >= 3 and steps >= 100  # well past the 3 x 31 steps that fell short
    assert r.probe and r.given == ()
    assert "135M" in r.reasons["lr"] and "steps per epoch" in r.reasons["epochs"]


@pytest.mark.parametrize(("base", "lr"), [(TINY, 3e-3), (SMOLLM2, 1e-3), (SEVEN_B, 2.5e-4)])
def test_learning_rate_falls_with_base_size(base, lr):
    assert choose(rows(500), base, CPU).values["lr"] == pytest.approx(lr, rel=0.1)


def test_a_small_base_trains_more_steps_than_a_large_one_on_the_same_rows():
    small = choose(rows(300), TINY, CPU).values
    large = choose(rows(300), SEVEN_B, CPU).values
    assert small["epochs"] > large["epochs"] >= 1


def test_large_datasets_get_one_to_three_epochs_bigger_batches_and_rank():
    v = choose(rows(60_000), SMOLLM2, CPU).values
    assert v["epochs"] == 1.0 and v["batch_size"] == 16 and v["r"] == 32 and v["alpha"] == 64
    assert choose(rows(5_000), TINY, CPU).values["epochs"] <= 3


def test_tiny_datasets_are_capped_in_epochs():
    assert choose(rows(10), TINY, CPU).values["epochs"] == 40.0


def test_explicit_values_win_and_are_recorded_as_given():
    r = choose(rows(243), SMOLLM2, CPU, given={"lr": 5e-5, "r": 4, "epochs": 1.0,
                                               "batch_size": None})
    assert r.values["lr"] == 5e-5 and r.values["r"] == 4 and r.values["epochs"] == 1.0
    assert r.values["alpha"] == 8.0  # still auto, follows the given rank
    assert r.values["batch_size"] == 8  # None means "not given"
    assert r.reasons["lr"] == r.reasons["r"] == "given"
    assert r.given == ("epochs", "lr", "r") and not r.probe  # a given lr is not probed


def test_no_probe_under_torchrun():
    r = choose(rows(243), SMOLLM2, Compute(device="cpu", threads=2, world_size=2))
    assert not r.probe and r.notes


def test_eval_steps_give_about_a_dozen_validation_points():
    v = choose(rows(243), SMOLLM2, CPU).values
    total = v["epochs"] * -(-243 // 8)
    assert 10 <= total / v["eval_steps"] <= 13


def test_validation_is_as_frequent_as_its_cost_allows():
    """20 validation rows at batch 8 cost under a step: a point every 6 steps whether the run
    is 69 or 125 steps long, so the early stop's patience is the same 18 steps for both."""
    assert eval_every(125, val_rows=20, batch_size=8) == 6
    assert eval_every(69, val_rows=20, batch_size=8) == 6
    assert eval_every(125) == 11  # rows unknown: 12 points over the run
    assert eval_every(2000, val_rows=20, batch_size=8) == 67  # never more than 30 points
    assert eval_every(600, val_rows=200, batch_size=16) == 28  # a large split costs more
    assert eval_every(48, val_rows=200, batch_size=8) == 4  # yet at least 12 points
    r = choose(DataStats(rows=180, mean_tokens=60.0, max_tokens=90, val_rows=20), SMOLLM2, CPU)
    assert r.values["eval_steps"] == 6 and "20 validation rows" in r.reasons["eval_steps"]


def test_a_loss_below_the_least_gain_has_converged():
    assert converged(3e-4, 4e-4) and not converged(5e-4, 4e-4)
    assert not converged(float("nan"), 4e-4) and not converged(0.0, 0.0)  # gain 0: never


def test_the_early_stop_threshold_shrinks_with_the_answer_length():
    """A one-word label needs a larger per-token drop of the validation loss to count as a
    gain than a 25-token JSON answer: the same ~1% of a whole answer's probability."""
    short = choose(DataStats(rows=144, mean_tokens=60.0, max_tokens=90, answer_tokens=3.0),
                   SMOLLM2, CPU)
    long = choose(DataStats(rows=144, mean_tokens=90.0, max_tokens=120, answer_tokens=25.0),
                  SMOLLM2, CPU)
    assert short.min_gain == pytest.approx(0.01 / 3) and long.min_gain == pytest.approx(4e-4)
    assert "3-token answer" in short.reasons["patience"]
    assert short.as_lineage()["min_gain"] == short.min_gain


def test_no_rows_is_a_clear_error():
    with pytest.raises(InvalidArgument):
        choose(rows(0), SMOLLM2, CPU)


@pytest.mark.parametrize(("n", "val"), [(3, 0), (10, 2), (40, 8), (270, 27), (5000, 200)])
def test_validation_split_size(n, val):
    assert validation_rows(n) == val


def test_probe_candidates_bracket_the_rule_within_the_safe_range():
    assert probe_candidates(1e-3) == [3.3e-4, 1e-3, 3e-3]
    assert probe_candidates(3e-3) == [1e-3, 3e-3]  # never above 3e-3


def test_probe_keeps_the_rule_unless_another_rate_is_clearly_better():
    assert pick_probe({3.3e-4: 1.0, 1e-3: 0.50, 3e-3: 0.495}, 1e-3) == 1e-3  # within 2%
    assert pick_probe({3.3e-4: 1.0, 1e-3: 0.50, 3e-3: 0.30}, 1e-3) == 3e-3
    assert pick_probe({3.3e-4: float("nan"), 1e-3: float("inf"), 3e-3: 0.9}, 1e-3) == 3e-3


def test_the_rate_below_the_rules_is_tried_only_when_the_rules_did_not_learn():
    """Classify on SmolLM2: 1e-3 took the validation loss from ~3 to 0.044 in 13 steps, so
    3.3e-4 is not tried; a rule rate that diverged or barely moved the loss is."""
    assert not needs_lower(0.044, 3.1)
    assert needs_lower(2.0, 3.1) and needs_lower(float("nan"), 3.1) and needs_lower(None, 3.1)


@pytest.mark.parametrize(("text", "s"), [("90s", 90), ("10m", 600), ("1.5h", 5400), ("45", 45),
                                         (30, 30)])
def test_budget_parses(text, s):
    assert parse_budget(text) == s


@pytest.mark.parametrize("bad", ["ten minutes", "-5m", "0", "5d"])
def test_bad_budget_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidArgument) as e:
        parse_budget(bad)
    assert e.value.field == "budget"


def test_fit_budget_cuts_epochs_to_what_the_measured_speed_affords():
    assert fit_budget(10.0, 30, 0.1, 600) == (10.0, None)  # 300 steps in 30 s: fits
    epochs, why = fit_budget(10.0, 30, 1.0, 60)  # 51 steps affordable of 300
    assert epochs == pytest.approx(51 / 30, rel=0.01) and "300 planned steps cut to 51" in why


def test_the_demo_trains_every_tenant_with_the_automatic_recipe():
    from loraplex.trainer import chat_tasks, tasks
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.recipe import AUTO_FIELDS

    assert not hasattr(tasks, "TENANT_RECIPE") and not hasattr(chat_tasks, "TENANT_RECIPE")
    for recipe in (tasks.DEMO_TRAIN_CONFIG, chat_tasks.REAL_TRAIN_CONFIG):
        assert not set(recipe) & set(AUTO_FIELDS), recipe
        cfg = TrainConfig(base="b", data="d", name="acme/x", **recipe)
        assert all(v is None for v in cfg.auto_fields().values())


def test_fit_budget_counts_a_fractional_plan_as_the_trainer_does():
    """119 steps left after a probe are 6.6111 epochs of 18: still 119 planned, not 118."""
    _, why = fit_budget(round(119 / 18, 4), 18, 1.0, 50)
    assert "119 planned steps cut to 42" in why
