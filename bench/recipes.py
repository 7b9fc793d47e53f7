"""Does `loraplex train` with no hyper-parameter flags match a grid search? Six small tasks.

    python -m bench.recipes                       # tiny base, all six tasks, the full grid
    python -m bench.recipes --quick               # 2 tasks (one tuning, one held out), 4 grid points
    python -m bench.recipes --base smollm2 --tasks classify,chat --grid-lr 1e-3 --grid-r 16
    python -m bench.recipes --base smollm2 --grid-json earlier.json   # only the defaults train

Per task (`bench/recipe_tasks.py`: classification, extraction to a fixed format, lookup
from the prompt, rewriting to a house style, multi-turn chat, long and short answers),
in this one run: `loraplex train` with defaults (the automatic recipe, its learning-rate
probe included) and every point of a grid (lr x rank x epochs, printed in the header),
each trained on the same rows with the same validation split and keeping the best
checkpoint by validation loss. Each adapter is scored by exact-match of greedy completions
on the task's held-out test rows (never seen in training). Time is the trainer's own wall
time, probe included, without loading the base or scoring.

Printed per task: defaults' exact-match and time, the grid's best point with its
exact-match and time, and the ratios (target: exact-match >= 0.9x the grid's best, time
<= 2x). Tasks tagged `held_out` were never used to set the recipe's constants and are
summarised apart. Every run also goes to `--json`.

Both sides train on the unquantized base (`--quantization none`) in the compute dtype
`auto` picks for the machine (`loraplex.compute`: bf16 where the CPU multiplies it
natively, else fp32): quantization is a serving choice, not a recipe one, and nf4 on a CPU
only slows both sides alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.recipe_tasks import TASKS, write_task
from loraplex.compute import cpu_model


def machine(argv: list[str]) -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg": [round(x, 2) for x in os.getloadavg()],
            "command": "python -m bench.recipes " + " ".join(argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def base_dir(kind: str, cache: Path) -> Path:
    """The tiny embedded base (built and pre-trained once) or SmolLM2 (imported once)."""
    from loraplex.app.demo_bases import prepare

    return prepare(kind, cache, lambda s: print(s))


def score(base: Path, adapter: Path, test: Path, max_new_tokens: int) -> float:
    from peft import PeftModel

    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.data import load_jsonl
    from loraplex.trainer.evaluate import evaluate, max_completion_tokens
    from loraplex.trainer.model import load_base

    examples = load_jsonl(test).examples
    cfg = TrainConfig(base=str(base), data=str(test), name="bench/score", quantization="none")
    model, tok = load_base(base, cfg)
    model = PeftModel.from_pretrained(model, str(adapter))
    res = evaluate(model, tok, examples,
                   max_new_tokens=max_completion_tokens(tok, examples, max_new_tokens))
    return res.exact_match


def load_grid(path: Path, head: dict[str, Any], base: str, a: argparse.Namespace,
              tasks: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each task's grid points from an earlier run's JSON; SystemExit unless that run was on
    the same CPU (model, capability, cores), base and rows, and holds every task asked for."""
    old = json.loads(path.read_text())
    same = {k: old["machine"].get(k) == head[k] for k in ("cpu", "capability", "cores")}
    same["base"] = old.get("base") == base
    same.update({k: old.get(k, getattr(a, k)) == getattr(a, k) for k in ("n_train", "n_test")})
    if not all(same.values()):
        differ = [k for k, v in same.items() if not v]
        raise SystemExit(f"{path}: not comparable with this run ({', '.join(differ)} differ)")
    missing = [t for t in tasks if not old["tasks"].get(t, {}).get("grid")]
    if missing:
        raise SystemExit(f"{path}: no grid points for {missing}")
    print(f"grid points from {path} ({old['machine']['date']})")
    return {t: old["tasks"][t]["grid"] for t in tasks}


def run_one(base: Path, paths: dict[str, Path], out: Path, flags: dict[str, Any],
            max_new_tokens: int) -> dict[str, Any]:
    from loraplex.trainer.cli import run_train

    res = run_train({"base": str(base), "data": str(paths["train"]), "name": "bench/task",
                     "quantization": "none", "publish": False, "output_dir": str(out),
                     **flags}, None, progress=False)
    m = res["metrics"]
    return {"flags": flags, "exact_match": score(base, Path(res["adapter_dir"]), paths["test"],
                                                 max_new_tokens),
            "seconds": m["total_s"], "steps": m["steps"], "best_step": m["best_step"],
            "val_loss": m["val_loss"], "recipe": res["recipe"]["values"],
            "notes": res["recipe"].get("notes", []),
            "probe": None if not res.get("probe") else {
                "chosen": res["probe"]["chosen"],
                "val_loss": {f"{k:.1e}": v for k, v in res["probe"]["val_loss"].items()}}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--base-dir", default=None,
                    help="a base directory already built or imported (overrides --base)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--grid-lr", default="1e-3,3e-3")
    ap.add_argument("--grid-r", default="8,16")
    ap.add_argument("--grid-epochs", default="5,15")
    ap.add_argument("--quick", action="store_true",
                    help="classify (tune) and chat (held out), grid lr 3e-3 x r 8,16 x epochs 5,15")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "loraplex" / "bench-recipes"))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", default=None, help="write every run here")
    ap.add_argument("--skip-defaults", action="store_true",
                    help="grid points only (to split one comparison across processes)")
    ap.add_argument("--grid-json", default=None,
                    help="take the grid points from this earlier --json of the same machine, "
                         "base and rows: only the defaults train (to measure a change of "
                         "the automatic recipe against a grid that does not depend on it)")
    a = ap.parse_args(argv)
    if a.quick:
        a.tasks, a.grid_lr = "classify,chat", "3e-3"
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
    grid = list(itertools.product([float(x) for x in a.grid_lr.split(",")],
                                  [int(x) for x in a.grid_r.split(",")],
                                  [float(x) for x in a.grid_epochs.split(",")]))
    head = machine(argv)
    print(f"machine: {head['cpu']} ({head['capability']}), {head['cores']} cores, "
          f"{head['torch_threads']} torch threads, torch {head['torch']}, "
          f"load avg {head['load_avg']}; {head['date']}")
    print(f"command: {head['command']}")
    shown = a.base_dir or a.base
    print(f"base: {shown}; {a.n_train} rows per task ({a.n_test} more held out for "
          f"exact-match); grid: lr {a.grid_lr} x r {a.grid_r} (alpha 2r) x epochs "
          f"{a.grid_epochs}, batch 8, no dropout, best checkpoint by val loss")
    earlier = load_grid(Path(a.grid_json), head, shown, a, tasks) if a.grid_json else None
    base = Path(a.base_dir) if a.base_dir else base_dir(a.base, Path(a.cache))
    results: dict[str, Any] = {"machine": head, "base": shown, "grid": grid, "tasks": {},
                               "n_train": a.n_train, "n_test": a.n_test,
                               "grid_from": a.grid_json}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        for task in tasks:
            paths = write_task(task, Path(tmp) / "data", n_train=a.n_train, n_test=a.n_test)
            t0 = time.perf_counter()
            default = None
            if not a.skip_defaults:
                default = run_one(base, paths, Path(tmp) / task / "default", {},
                                  a.max_new_tokens)
                print(f"{task}: defaults {default['exact_match']:.0%} in "
                      f"{default['seconds']:.0f}s ({default['recipe']})", flush=True)
            points = list(earlier[task]) if earlier else []
            for lr, r, epochs in ([] if earlier else grid):
                flags = {"lr": lr, "r": r, "alpha": 2.0 * r, "epochs": epochs, "batch_size": 8,
                         "dropout": 0.0}
                p = run_one(base, paths, Path(tmp) / task / f"g-{lr}-{r}-{epochs}", flags,
                            a.max_new_tokens)
                print(f"  grid lr {lr:.0e} r {r} epochs {epochs:g}: {p['exact_match']:.0%} "
                      f"in {p['seconds']:.0f}s", flush=True)
                points.append(p)
            # the grid's best: highest exact-match, the fastest of those
            best = max(points, key=lambda p: (p["exact_match"], -p["seconds"]))
            results["tasks"][task] = {"split": TASKS[task][2], "kind": TASKS[task][1],
                                      "default": default, "grid": points, "best": best,
                                      "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append((task, default, best))
    print()
    print("| task | kind | suite | defaults EM | defaults s | grid best (lr, r, epochs) | "
          "best EM | best s | EM ratio | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = [(t, d, b) for t, d, b in rows if d is not None]
    for task, d, b in rows:
        f = b["flags"]
        em_ratio = d["exact_match"] / b["exact_match"] if b["exact_match"] else float("nan")
        print(f"| {task} | {TASKS[task][1]} | {TASKS[task][2]} | {d['exact_match']:.0%} | "
              f"{d['seconds']:.0f} | {f['lr']:.0e}, {f['r']}, {f['epochs']:g} | "
              f"{b['exact_match']:.0%} | {b['seconds']:.0f} | {em_ratio:.2f} | "
              f"{d['seconds'] / b['seconds']:.2f} |")
    for split in ("tune", "held_out"):
        sel = [(d, b) for t, d, b in rows if TASKS[t][2] == split]
        if sel:
            ok = sum(d["exact_match"] >= 0.9 * b["exact_match"]
                     and d["seconds"] <= 2 * b["seconds"] for d, b in sel)
            print(f"{split}: {ok}/{len(sel)} tasks meet both targets")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
