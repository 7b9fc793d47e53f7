"""Training throughput: `loraplex train` vs a plain peft + transformers.Trainer script.

    python -m bench.train                         # tiny base, acme task, 60 steps, fp32
    python -m bench.train --quantization nf4 --steps 30
    python -m bench.train --base ./base --data my.jsonl

Both sides train the same configuration (base, data, LoRA r/alpha/targets, batch size,
steps, lr, seed, quantization) in separate child processes, one after the other, in this
one run, so each gets its own peak memory; `--repeats` interleaves several runs of each
and keeps the best (on a shared CPU a single run can be 10x off). Printed: tokens/s
(non-padding input tokens per second of the training loop) and peak memory (CUDA: max
allocated; CPU: peak RSS of the process) for both, and loraplex/plain ratios. loraplex also
validates, checkpoints and writes metrics during the run; the plain script does none of that,
so the loraplex side is run with validation off and one checkpoint at the end (the same
work), and it still pays for its progress bar and metrics file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _plain(a: argparse.Namespace) -> dict[str, Any]:
    """What a user would write with peft + Trainer directly (same data rendering)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from loraplex.trainer.data import encode_example, load_jsonl

    set_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.base)
    kw: dict[str, Any] = {"dtype": torch.float32}
    cuda = torch.cuda.is_available()
    if a.quantization == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kw["device_map"] = {"": "cuda" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(a.base, **kw)
    if a.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.05,
                                             target_modules=a.targets.split(","),
                                             task_type="CAUSAL_LM"))
    rows = []
    for ex in load_jsonl(a.data).examples:
        enc = encode_example(tok, ex, max_seq_len=1 << 20)  # the trainer's own rows
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})

    def collate(batch):
        n = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id)
        lab = torch.full((len(batch), n), -100)
        att = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            lab[i, :len(r["labels"])] = torch.tensor(r["labels"])
            att[i, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=a.batch_size,
                                 max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="cosine",
                                 warmup_steps=0.05, logging_steps=10, save_strategy="no",
                                 report_to="none", seed=a.seed, use_cpu=not cuda,
                                 remove_unused_columns=False, disable_tqdm=True,
                                 include_num_input_tokens_seen="non_padding",
                                 optim="adamw_torch")
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        model.save_pretrained(Path(out) / "adapter")
    tokens = trainer.state.num_input_tokens_seen
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def _loraplex(a: argparse.Namespace) -> dict[str, Any]:
    from loraplex.trainer.cli import run_train

    with tempfile.TemporaryDirectory() as out:
        res = run_train({"base": a.base, "data": a.data, "name": "bench/train",
                         "quantization": a.quantization, "compute_dtype": "float32",
                         "r": a.r, "alpha": a.alpha, "target_modules": a.targets,
                         "max_steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                         "seed": a.seed, "val_fraction": 0.0, "eval_steps": a.steps,
                         "logging_steps": 10, "output_dir": str(Path(out) / "run"),
                         "publish": False}, None, progress=False)
    m = res["metrics"]
    return {"tokens": m["tokens"], "wall_s": m["tokens"] / m["tokens_per_s"],
            "tokens_per_s": m["tokens_per_s"]}


def _child(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    out = _plain(a) if a.child == "plain" else _loraplex(a)
    out["peak_memory_mb"] = _peak_memory_mb()
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(kind: str, argv: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.train", "--child", kind, *argv],
                          capture_output=True, text=True, env={**os.environ})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{kind} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _prepare(a: argparse.Namespace, tmp: Path) -> None:
    """Default inputs: the tiny embedded base (raw: speed does not depend on its training)
    and the acme task."""
    if a.base is None:
        from loraplex.basemodel import build_base

        a.base = str(build_base(tmp / "base", size=a.size, seed=0))
    if a.data is None:
        from loraplex.trainer.tasks import write_tasks

        a.data = str(write_tasks(tmp / "data", n_train=400, n_test=10)["acme"]["train"])
    if a.targets is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from loraplex.trainer.model import linear_target_modules

        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.base))
        a.targets = ",".join(linear_target_modules(m))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base")
    ap.add_argument("--data")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved runs per side.")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--child", choices=["plain", "loraplex"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a)
        return
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        _prepare(a, Path(tmp))
        child_argv = ["--base", a.base, "--data", a.data, "--quantization", a.quantization,
                      "--steps", str(a.steps), "--batch-size", str(a.batch_size),
                      "--lr", str(a.lr), "--r", str(a.r), "--alpha", str(a.alpha),
                      "--targets", a.targets, "--seed", str(a.seed),
                      "--threads", str(a.threads)]
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "loraplex": []}
        for _ in range(a.repeats):  # interleaved, best of N: a shared CPU is noisy
            for kind in runs:
                runs[kind].append(_run_child(kind, child_argv))
        plain = max(runs["plain"], key=lambda r: r["tokens_per_s"])
        ours = max(runs["loraplex"], key=lambda r: r["tokens_per_s"])
    print(f"config: {a.steps} steps, batch {a.batch_size}, r {a.r}, quantization "
          f"{a.quantization}, targets {a.targets}, {a.threads} thread(s), best of {a.repeats}")
    for kind, rs in runs.items():
        print(f"  {kind} tokens/s per run: " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs))
    print(f"{'':10}{'tokens/s':>12}{'peak MB':>12}{'wall s':>10}")
    for label, r in (("plain", plain), ("loraplex", ours)):
        print(f"{label:10}{r['tokens_per_s']:12.1f}{r['peak_memory_mb']:12.1f}{r['wall_s']:10.2f}")
    print(f"ratio loraplex/plain: tokens/s {ours['tokens_per_s'] / plain['tokens_per_s']:.3f}, "
          f"peak memory {ours['peak_memory_mb'] / plain['peak_memory_mb']:.3f}")


if __name__ == "__main__":
    main()
