"""bench.recipes in its smallest form on the micro base: the commands a user runs for the
recipe table train at a grid point, then with defaults against that grid (`--grid-json`),
score both and print the table. Exact-match on a random 2-layer base is the benchmark's
business, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def recipes(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bench.recipes", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_defaults_train_against_an_earlier_runs_grid_on_the_micro_base(micro_base, tmp_path):
    common = ["--base-dir", str(micro_base), "--tasks", "classify", "--n-train", "24",
              "--n-test", "4", "--grid-lr", "3e-3", "--grid-r", "4", "--grid-epochs", "1",
              "--max-new-tokens", "4"]
    grid_json, both_json = tmp_path / "grid.json", tmp_path / "both.json"
    recipes(*common, "--skip-defaults", "--json", str(grid_json))
    (point,) = json.loads(grid_json.read_text())["tasks"]["classify"]["grid"]
    assert point["flags"] == {"lr": 3e-3, "r": 4, "alpha": 8.0, "epochs": 1.0, "batch_size": 8,
                              "dropout": 0.0}
    assert point["recipe"]["r"] == 4 and point["recipe"]["lr"] == 3e-3

    proc = recipes(*common, "--grid-json", str(grid_json), "--json", str(both_json))
    assert "| classify | classification | tune |" in proc.stdout, proc.stdout[-2000:]
    assert "tune: " in proc.stdout and "tasks meet both targets" in proc.stdout
    res = json.loads(both_json.read_text())
    assert res["machine"]["capability"] and res["machine"]["cores"] >= 1
    task = res["tasks"]["classify"]
    assert task["grid"] == [point]  # taken over, not trained again
    default = task["default"]
    # defaults: the automatic recipe chose its own values and measured the learning rate
    assert default["recipe"]["r"] and default["probe"] is not None
    for run in (default, point):
        assert 0.0 <= run["exact_match"] <= 1.0 and run["seconds"] > 0 and run["steps"] >= 1


def test_a_grid_from_other_rows_is_refused(micro_base, tmp_path):
    earlier = tmp_path / "grid.json"
    earlier.write_text(json.dumps({
        "machine": {"cpu": "another CPU", "capability": "AVX2", "cores": 2, "date": "-"},
        "base": str(micro_base), "n_train": 24, "n_test": 4,
        "tasks": {"classify": {"grid": [{"flags": {}}]}}}))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.recipes", "--base-dir", str(micro_base), "--tasks",
         "classify", "--n-train", "24", "--n-test", "4", "--grid-json", str(earlier)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "not comparable" in proc.stderr and "cpu" in proc.stderr
