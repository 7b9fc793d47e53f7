"""bench.dtype_train: the demo's training recipe on a real base, in float32 and in bfloat16.

    python -m bench.dtype_train --base demo-out/smollm2 --data demo-out/data/acme.train.jsonl \\
        [--steps 3] [--repeats 2] [--threads 1]

`make demo` writes both paths (the imported SmolLM2 base and the tenants' data). Each run is
`loraplex.trainer.train.train` with `trainer/chat_tasks.py`'s REAL_TRAIN_CONFIG, `--steps`
optimizer steps, in a child process of its own (`OMP_NUM_THREADS=--threads`); the dtypes
alternate `--repeats` times in this one run. Printed: the machine, then per run tokens/s and
the training loop's wall time, then bf16's best time over fp32's best time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

DTYPES = ("float32", "bfloat16")


def _child(base: str, data: str, dtype: str, steps: int, out: str) -> None:
    from loraplex.trainer.chat_tasks import REAL_TRAIN_CONFIG
    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.train import train

    recipe = {**REAL_TRAIN_CONFIG, "compute_dtype": dtype, "max_steps": steps,
              "logging_steps": 1}
    cfg = TrainConfig(base=base, data=data, name="bench/dtype", output_dir=out, publish=False,
                      **recipe)
    r = train(cfg, progress=False)
    print(json.dumps({"dtype": r.compute["dtype"], "steps": r.metrics["steps"],
                      "wall_s": r.metrics["wall_s"], "tokens_per_s": r.metrics["tokens_per_s"]}))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", choices=DTYPES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.base, a.data, a.child, a.steps, a.out)
        return {}
    from bench.dtype import header

    result: dict[str, Any] = {"machine": {**header(), "threads": a.threads,
                                          "command": "python -m bench.dtype_train "
                                          + " ".join(sys.argv[1:])}, "runs": []}
    print(json.dumps(result["machine"]))
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-dtype-") as tmp:
        for rep in range(a.repeats):
            for dtype in DTYPES:
                out = subprocess.run(
                    [sys.executable, "-m", "bench.dtype_train", "--base", a.base, "--data",
                     a.data, "--steps", str(a.steps), "--child", dtype, "--out",
                     f"{tmp}/{dtype}-{rep}"], env=env, capture_output=True, text=True,
                    check=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                result["runs"].append(run)
                print(json.dumps(run))
    best = {d: min(r["wall_s"] for r in result["runs"] if r["dtype"] == d) for d in DTYPES}
    result["bf16_over_fp32"] = round(best["bfloat16"] / best["float32"], 2)
    print(f"bf16 / fp32 training time (best of {a.repeats}): {result['bf16_over_fp32']}")
    return result


if __name__ == "__main__":
    main()
