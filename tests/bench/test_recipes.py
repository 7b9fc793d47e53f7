"""bench.recipes in its smallest form on the micro base: the command a user runs for the
recipe table trains with defaults and at a grid point, scores both and prints the table.
Exact-match on a random 2-layer base is the benchmark's business, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_one_task_on_the_micro_base_prints_defaults_beside_the_grid(micro_base, tmp_path):
    out = tmp_path / "recipes.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.recipes", "--base-dir", str(micro_base), "--tasks", "classify",
         "--n-train", "24", "--n-test", "4", "--grid-lr", "3e-3", "--grid-r", "4",
         "--grid-epochs", "1", "--max-new-tokens", "4", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| classify | classification | tune |" in proc.stdout, proc.stdout[-2000:]
    assert "tune: " in proc.stdout and "tasks meet both targets" in proc.stdout
    res = json.loads(out.read_text())
    assert res["machine"]["capability"] and res["machine"]["cores"] >= 1
    task = res["tasks"]["classify"]
    default, (point,) = task["default"], task["grid"]
    assert point["flags"] == {"lr": 3e-3, "r": 4, "alpha": 8.0, "epochs": 1.0, "batch_size": 8,
                              "dropout": 0.0}
    assert point["recipe"]["r"] == 4 and point["recipe"]["lr"] == 3e-3
    # defaults: the automatic recipe chose its own values and measured the learning rate
    assert default["recipe"]["r"] and default["probe"] is not None
    for run in (default, point):
        assert 0.0 <= run["exact_match"] <= 1.0 and run["seconds"] > 0 and run["steps"] >= 1
