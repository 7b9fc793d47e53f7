"""Trainer callbacks: a rich progress bar, a metrics JSONL file, and a test fault hook.

Only the main process (rank 0) draws or writes, so a `torchrun` job prints one bar and one
file. Tokens/s counts non-padding input tokens across all processes (Trainer's
`num_input_tokens_seen`), measured from the start of *this* process's training, so a
resumed run reports its own speed rather than an average polluted by the restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


class Throughput:
    """Shared clock: tokens/s since training (or resuming) began."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.tokens0 = 0
        self.tokens = 0
        self.elapsed = 0.0

    def start(self, state: Any) -> None:
        self.t0 = time.perf_counter()
        self.tokens0 = int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def update(self, state: Any) -> float:
        self.tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.tokens0
        self.elapsed = time.perf_counter() - self.t0
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


class MetricsFileCallback(TrainerCallback):
    """Appends every logged dict (with step, epoch, time, tokens/s) to `metrics.jsonl`."""

    def __init__(self, path: Path, clock: Throughput) -> None:
        self.path = path
        self.clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.start(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
               "tokens_per_s": round(self.clock.update(state), 2), **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec, default=float) + "\n")


class RichProgressCallback(TrainerCallback):
    """Step, epoch, train and validation loss, learning rate, tokens/s and ETA on one live
    line (rank 0, TTY or not)."""

    def __init__(self, clock: Throughput, *, enabled: bool = True) -> None:
        self.clock = clock
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None
        self.loss = float("nan")
        self.val_loss = float("nan")
        self.lr = 0.0
        self.tps = 0.0
        self.epoch = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.enabled and state.is_world_process_zero):
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}  "
                       "val {task.fields[val]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            console=Console(stderr=True))  # stdout stays clean for the result (and --json)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps,
                                           completed=state.global_step, **self._fields())

    def _fields(self) -> dict[str, str]:
        return {"epoch": f"{self.epoch:.2f}", "loss": f"{self.loss:.4f}", "val": f"{self.val_loss:.4f}", "lr": f"{self.lr:.2e}",
                "tps": f"{self.tps:.0f}"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        self.val_loss = logs.get("eval_loss", self.val_loss)
        self.lr = logs.get("learning_rate", self.lr)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        self.tps = self.clock.update(state)
        self.epoch = float(state.epoch or 0.0)
        self.progress.update(self.task, completed=state.global_step, **self._fields())

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
