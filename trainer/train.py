"""A training run: data -> LoRA on a (quantized) base -> best adapter on disk, with metrics.

Built on `transformers.Trainer`, which already does the parts that are easy to get subtly
wrong: warm-up schedules, gradient accumulation, DDP under `torchrun`, and checkpoints that
hold optimizer, scheduler and RNG state (what makes `--resume` end at the same digest as an
uninterrupted run). This module only decides the configuration and collects the results.

Run directory (`TrainConfig.run_dir`):

    recipe.json            the chosen recipe, why, and the learning-rate probe (`recipe.py`)
    checkpoint-<step>/     Trainer checkpoints (the latest and the best are kept)
    metrics.jsonl          every logged metric, one JSON object a line
    curve.png              training and validation loss over steps, the kept step marked
    adapter/               the best weights by validation loss in peft format: what gets
                           published (the last weights when there is no validation split)

Hyper-parameters the user did not give are chosen by `recipe.choose` from the data and the
base; the learning rate is then measured by a short probe (`probe.py`) when the user gave
none, and the winning candidate's adapter goes on training with its optimizer state (its
steps count toward the run) unless the user gave the run's length; a winner whose
validation loss is already below the early stop's least gain is published as it is.
`--budget` bounds probe + training: the planned epochs are cut to what the probe's measured
speed affords, and a callback stops a run that still overruns (the best checkpoint so far
is kept).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from loraplex.errors import InvalidArgument
from loraplex.trainer.callbacks import MetricsFileCallback, RichProgressCallback, Throughput
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.curve import write_curve_png
from loraplex.trainer.data import (
    IGNORE_INDEX,
    Dataset,
    Example,
    encode_dataset,
    load_jsonl,
    pad_batch,
    stop_ids,
)
from loraplex.trainer.loss import completion_trainer
from loraplex.trainer.probe import PROBE_SHARE, ProbeOutcome, probe_lr
from loraplex.trainer.recipe import (
    MIN_STEPS_TO_PROBE,
    BaseStats,
    Compute,
    DataStats,
    Recipe,
    choose,
    eval_every,
    fit_budget,
    min_gain,
    parse_budget,
    planned_steps,
    validation_rows,
)
from loraplex.trainer.stopping import RATE_CUT, EarlyStop

log = logging.getLogger("loraplex.trainer")
MAX_EM_EXAMPLES = 64  # greedy generation is slow on CPU: exact-match on at most this many


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    dataset: Dataset
    val_dataset: Dataset | None


@dataclass
class TrainResult:
    adapter_dir: Path
    run_dir: Path
    is_main: bool  # rank 0 (or the only process): the one that publishes
    metrics: dict[str, Any] = field(default_factory=dict)
    splits: Splits | None = None
    compute: dict[str, Any] = field(default_factory=dict)  # ComputeChoice.record(): lineage
    config: TrainConfig | None = None  # the resolved configuration (every auto field filled)
    report: dict[str, Any] = field(default_factory=dict)  # recipe, probe, curve, checkpoint
    curve_png: Path | None = None


def load_splits(cfg: TrainConfig) -> Splits:
    """Parse every data file (fails before any model is loaded) and carve the validation
    split: `--val-data` if given, else a seeded `--val-fraction` of the training file."""
    ds = load_jsonl(cfg.data)
    if cfg.val_data:
        vds = load_jsonl(cfg.val_data)
        if vds.format != ds.format:
            raise InvalidArgument(f"{cfg.val_data} holds {vds.format} rows but {cfg.data} holds "
                                  f"{ds.format} rows; use one format", field="val_data")
        return Splits(train=ds.examples, val=vds.examples, dataset=ds, val_dataset=vds)
    idx = list(range(len(ds.examples)))
    random.Random(cfg.seed).shuffle(idx)
    if cfg.val_fraction is None:
        n_val = validation_rows(len(idx))
    else:
        n_val = round(len(idx) * cfg.val_fraction)
        if cfg.val_fraction > 0 and n_val == 0:
            n_val = 1
    if n_val >= len(idx):
        raise InvalidArgument(f"{cfg.data}: {len(idx)} example(s) leave nothing to train on "
                              f"after a {cfg.val_fraction} validation split", field="val_fraction")
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return Splits(train=[ds.examples[i] for i in train], val=[ds.examples[i] for i in val],
                  dataset=ds, val_dataset=None)


class _Rows:
    """A map-style dataset of encoded rows (what Trainer's sampler indexes)."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


def _encode(tokenizer: Any, examples: list[Example], cfg: TrainConfig, what: str,
            stop: set[int]) -> _Rows:
    rows, n_trunc = encode_dataset(tokenizer, examples, max_seq_len=cfg.max_seq_len,
                                   train_on_prompt=cfg.train_on_prompt, stop=stop)
    if n_trunc:
        log.warning("%d of %d %s example(s) are longer than --max-seq-len %d and were truncated",
                    n_trunc, len(rows), what, cfg.max_seq_len)
    return _Rows(rows)


def _training_args(cfg: TrainConfig, has_val: bool, cuda: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(cfg.run_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives resume
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not cuda,
        # gloo is torch's CPU collective backend; only named when torchrun started several
        # processes (naming it in a single process makes accelerate expect a process group).
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        prediction_loss_only=True,  # validation is scored by loss (exact-match runs apart)
        optim="adamw_torch",
        log_level="warning",
    )


def _checkpoint_to_resume(cfg: TrainConfig) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    run_dir = cfg.run_dir
    last = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if cfg.resume:
        if last is None:
            log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir)
        return last
    return None


def _clear_stale_run(cfg: TrainConfig, is_main: bool) -> None:
    """A fresh (non-resumed) run must not leave an older run's checkpoints behind: a later
    --resume would otherwise pick up someone else's state."""
    if not is_main or not cfg.run_dir.is_dir():
        return
    for p in cfg.run_dir.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in ("metrics.jsonl", "adapter", RECIPE_FILE, "curve.png"):
        p = cfg.run_dir / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    for rec in reversed(history):
        if key in rec:
            return float(rec[key])
    return None


def train(cfg: TrainConfig, *, extra_callbacks: list[Any] | None = None,
          progress: bool = True) -> TrainResult:
    """Choose the recipe, train, keep the best weights by validation loss, save them under
    `run_dir/adapter` with the curve beside them. No publishing."""
    import torch
    from transformers import set_seed

    from loraplex.trainer.model import choose_compute, load_base, wrap_lora

    t_start = time.perf_counter()
    budget_s = parse_budget(cfg.budget)
    splits = load_splits(cfg)  # every data error surfaces before the model loads
    cuda = torch.cuda.is_available()
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume_from = _checkpoint_to_resume(cfg)
    if resume_from is None:
        _clear_stale_run(cfg, is_main)

    set_seed(cfg.seed)  # LoRA A matrices are drawn in get_peft_model: seed before it
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    choice = choose_compute(cfg, device)
    log.info("training %s: %s", cfg.name, choice.line())
    if progress and is_main:
        print(f"train {cfg.name}: {choice.line()}", file=sys.stderr, flush=True)
    model, tokenizer = load_base(cfg.base, cfg, device=device, choice=choice)
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))  # EOS + end-of-turn
    train_rows = _encode(tokenizer, splits.train, cfg, "training", stop)
    val_rows = _encode(tokenizer, splits.val, cfg, "validation", stop) if splits.val else None

    say = _sayer(progress and is_main)
    recipe = _recipe_for(cfg, model, train_rows, len(val_rows) if val_rows else 0,
                         resume_from, cuda)
    rcfg = cfg.model_copy(update=recipe.values)
    set_seed(cfg.seed)
    model = wrap_lora(model, rcfg)
    probe: ProbeOutcome | None = None
    steps_per_epoch = max(1, math.ceil(len(train_rows) / (rcfg.batch_size * rcfg.grad_accum)))
    planned = rcfg.max_steps if rcfg.max_steps > 0 else int(rcfg.epochs * steps_per_epoch)
    if recipe.probe and planned < MIN_STEPS_TO_PROBE:
        recipe.notes.append(f"no learning-rate probe: {planned} steps are too few to share")
    elif recipe.probe and val_rows is not None and resume_from is None:
        probe_s = None if budget_s is None else PROBE_SHARE * (
            budget_s - (time.perf_counter() - t_start))
        # the winner's probe steps count toward the run when the run's length is the
        # recipe's own; a length the user gave is trained in full from the initial adapter
        carry = "epochs" not in recipe.given and rcfg.max_steps <= 0
        probe = probe_lr(model, train_rows.rows, val_rows.rows, lr=rcfg.lr,
                         batch_size=rcfg.batch_size, seed=cfg.seed,
                         pad_id=tokenizer.pad_token_id, planned=planned,
                         gain=recipe.min_gain if rcfg.patience else 0.0, say=say,
                         seconds=probe_s, keep_winner=carry)
        chosen = probe.record["chosen"]
        rcfg = rcfg.model_copy(update={"lr": chosen})
        recipe.values["lr"] = chosen
        recipe.reasons["lr"] = probe.record["reason"]
        if probe.record["continued"] and not probe.record["converged"]:
            rcfg, note = _after_probe(rcfg, recipe, steps_per_epoch, planned,
                                      probe.record["continued"])
            recipe.notes.append(note)
    elif recipe.probe:
        recipe.notes.append("no learning-rate probe: " + (
            "resumed run" if resume_from else "no validation split to score it on"))
    record = probe.record if probe is not None else None
    if budget_s is not None and record is not None and rcfg.max_steps <= 0:
        left = budget_s - (time.perf_counter() - t_start)
        epochs, why = fit_budget(rcfg.epochs, steps_per_epoch, record["seconds_per_step"], left)
        if why:
            rcfg = _replan(rcfg, recipe, epochs, steps_per_epoch)
            recipe.notes.append(why)
    probe_is_run = record is not None and record["converged"]
    if probe_is_run:
        recipe.notes.append(f"the probe's winner is the run: its validation loss is below "
                            f"{recipe.min_gain:.1e}, so no further step could count as a gain")
    if is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / RECIPE_FILE).write_text(json.dumps(
            {"recipe": recipe.as_lineage(), "probe": record}, indent=1, default=float))
    say_recipe(say, recipe, record)

    if probe_is_run:
        run = _probe_run(model, record, steps_per_epoch)
    else:
        run = _trainer_run(cfg, rcfg, recipe, model, train_rows, val_rows,
                           pad=tokenizer.pad_token_id, cuda=cuda, resume_from=resume_from,
                           budget_s=budget_s, t_start=t_start,
                           optimizer=probe.optimizer if probe is not None else None,
                           progress=progress, extra_callbacks=extra_callbacks)
    run.metrics["total_s"] = round(time.perf_counter() - t_start, 3)
    recipe.notes.extend(run.notes)
    if run.budget_stop is not None:
        recipe.notes.append(f"the budget ran out at step {run.budget_stop}")

    adapter_dir = cfg.run_dir / "adapter"
    kept = _kept_reason(run.curve, run.best_step, run.last_step)
    curve_png = None
    if is_main:
        run.model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer_note = adapter_dir / "README.md"
        if tokenizer_note.exists():
            tokenizer_note.unlink()  # peft's generated model card: noise in the registry
        curve_png = write_curve_png(cfg.run_dir / "curve.png",
                                    [(c["step"], c["train_loss"]) for c in run.curve
                                     if "train_loss" in c],
                                    [(c["step"], c["val_loss"]) for c in run.curve
                                     if "val_loss" in c], run.best_step)
    metrics = run.metrics
    if splits.val and is_main:
        metrics.update(_val_exact_match(run.model, tokenizer, splits.val, rcfg))
    report = {"recipe": recipe.as_lineage(), "probe": record, "curve": run.curve,
              "checkpoint": {"step": run.best_step, "why": kept}}
    return TrainResult(adapter_dir=adapter_dir, run_dir=cfg.run_dir, is_main=is_main,
                       metrics=metrics, splits=splits, compute=choice.record(),
                       config=rcfg, report=report,
                       curve_png=curve_png)


@dataclass
class _Run:
    """What a finished run leaves: the model holding the weights to publish, the curve, the
    step those weights are from, and the run's metrics (exact-match added by the caller)."""

    model: Any
    curve: list[dict[str, Any]]
    best_step: int | None
    last_step: int
    metrics: dict[str, Any]
    budget_stop: int | None = None
    notes: list[str] = field(default_factory=list)  # the early stop's cuts and its reason


def _trainer_run(cfg: TrainConfig, rcfg: TrainConfig, recipe: Recipe, model: Any,
                 train_rows: _Rows, val_rows: _Rows | None, *, pad: int, cuda: bool,
                 resume_from: str | None, budget_s: float | None, t_start: float,
                 optimizer: Any | None, progress: bool, extra_callbacks: list[Any] | None
                 ) -> _Run:
    """The `transformers.Trainer` run: evaluation and checkpoints every `eval_steps`, the
    early stop with its one rate cut (`stopping.py`), the budget, and the best checkpoint by
    validation loss loaded at the end.
    `optimizer`: the probe winner's, state and all; the run then goes on without a second
    warm-up (the probe warmed the rate up and its moments are estimated already)."""
    from transformers.trainer_callback import PrinterCallback

    if optimizer is not None:
        rcfg = rcfg.model_copy(update={"warmup_ratio": 0.0})
    args = _training_args(rcfg, val_rows is not None, cuda)
    clock = Throughput()
    callbacks: list[Any] = [MetricsFileCallback(cfg.run_dir / "metrics.jsonl", clock),
                            RichProgressCallback(clock, enabled=progress)]
    if rcfg.patience and val_rows is not None:
        callbacks.append(EarlyStop(patience=rcfg.patience, gain=recipe.min_gain))
    budget_cb = None
    if budget_s is not None:
        budget_cb = BudgetCallback(t_start + budget_s)
        callbacks.append(budget_cb)
    callbacks += extra_callbacks or []
    trainer = completion_trainer(model=model, args=args, train_dataset=train_rows,
                                 eval_dataset=val_rows, callbacks=callbacks,
                                 data_collator=lambda rows: pad_batch(rows, pad),
                                 optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)

    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0
    history = trainer.state.log_history
    best_step = _best_step(trainer.state.best_model_checkpoint)
    metrics: dict[str, Any] = {
        # last logged loss; the run's mean when it ended before the first logging step
        "train_loss": _last(history, "loss") or float(out.training_loss),
        "train_loss_mean": float(out.training_loss),
        "val_loss": trainer.state.best_metric,
        "best_step": best_step,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "wall_s": round(wall, 3),
        "tokens": clock.tokens,
        "tokens_per_s": round(clock.tokens / clock.elapsed, 2) if clock.elapsed else None,
        "world_size": args.world_size,
        "resumed_from_step": _best_step(resume_from),
    }
    stop = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStop)),
                None)  # after a resume, the instance restored from the checkpoint
    notes = [f"the validation loss stalled at step {step}: learning rate cut to "
             f"{RATE_CUT:.2g}x" for step in (stop.cut_at if stop else [])]
    if stop is not None and stop.reason:
        notes.append("early stop: " + stop.reason)
    return _Run(model=trainer.model, curve=_curve(history), best_step=best_step,
                last_step=trainer.state.global_step, metrics=metrics, notes=notes,
                budget_stop=budget_cb.stopped_at if budget_cb is not None else None)


def _probe_run(model: Any, record: dict[str, Any], steps_per_epoch: int) -> _Run:
    """The run when the probe's winner has converged: its adapter as the probe left it, one
    validation point (the probe's), no Trainer."""
    steps, rate = int(record["continued"]), record["chosen"]
    val_loss = float(record["val_loss"][rate])
    curve = [{"step": steps, "train_loss": round(float(record["train_loss"][rate]), 5),
              "val_loss": round(val_loss, 5)}]
    tokens = int(record["tokens"][rate])
    metrics: dict[str, Any] = {
        "train_loss": float(record["train_loss"][rate]),
        "train_loss_mean": float(record["train_loss_mean"][rate]),
        "val_loss": val_loss, "best_step": steps, "steps": steps,
        "epochs": round(steps / steps_per_epoch, 4), "wall_s": record["seconds"],
        "tokens": tokens,
        "tokens_per_s": round(tokens / record["seconds"], 2) if record["seconds"] else None,
        "world_size": 1, "resumed_from_step": None,
    }
    return _Run(model=model, curve=curve, best_step=steps, last_step=steps, metrics=metrics)


RECIPE_FILE = "recipe.json"


def _recipe_for(cfg: TrainConfig, model: Any, train_rows: _Rows, n_val: int,
                resume_from: str | None, cuda: bool) -> Recipe:
    """The recipe a resumed run started with (its `recipe.json`), else a fresh choice."""
    stored = cfg.run_dir / RECIPE_FILE
    if resume_from is not None and stored.is_file():
        rec = json.loads(stored.read_text())["recipe"]
        values = {**rec["values"], **{k: v for k, v in cfg.auto_fields().items()
                                      if v is not None and k != "val_fraction"}}
        return Recipe(values=values, reasons=rec["reasons"], given=tuple(rec["given"]),
                      probe=False, target_steps=rec["target_steps"],
                      notes=[*rec.get("notes", []), "resumed: the recipe of the first start"],
                      min_gain=float(rec.get("min_gain", min_gain(1.0))),
                      val_rows=int(rec.get("val_rows", 0)))
    import torch

    lengths = [len(r["input_ids"]) for r in train_rows.rows]
    answers = [sum(1 for t in r["labels"] if t != IGNORE_INDEX) for r in train_rows.rows]
    data = DataStats(rows=len(lengths), mean_tokens=sum(lengths) / max(1, len(lengths)),
                     max_tokens=max(lengths, default=0),
                     answer_tokens=sum(answers) / max(1, len(answers)), val_rows=n_val)
    mc = getattr(model, "config", None)
    base = BaseStats(params=_param_count(model),
                     architecture=str(getattr(mc, "model_type", "unknown")),
                     hidden=int(getattr(mc, "hidden_size", 0) or getattr(mc, "n_embd", 0) or 0),
                     layers=int(getattr(mc, "num_hidden_layers", 0)
                                or getattr(mc, "n_layer", 0) or 0))
    compute = Compute(device="cuda" if cuda else "cpu", threads=torch.get_num_threads(),
                      world_size=int(os.environ.get("WORLD_SIZE", "1")))
    given = {k: v for k, v in cfg.auto_fields().items() if k != "val_fraction"}
    return choose(data, base, compute, given)


def _param_count(model: Any) -> int:
    """Parameters of the base (a 4-bit weight packs two per stored byte)."""
    n = 0
    for p in model.parameters():
        n += p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
    return n


def _replan(cfg: TrainConfig, recipe: Recipe, epochs: float, steps_per_epoch: int
            ) -> TrainConfig:
    """`cfg` (and the recipe's values) with the run's length set to `epochs` and the
    validation points re-spaced over it."""
    eval_steps = eval_every(planned_steps(epochs, steps_per_epoch), recipe.val_rows,
                            cfg.batch_size)
    recipe.values.update(epochs=epochs, eval_steps=eval_steps)
    return cfg.model_copy(update={"epochs": epochs, "eval_steps": eval_steps})


def _after_probe(cfg: TrainConfig, recipe: Recipe, steps_per_epoch: int, planned: int,
                 done: int) -> tuple[TrainConfig, str]:
    """`cfg` with the planned run shortened by the `done` steps the probe's winner already
    trained (at least one step is left); the note that says so."""
    left = max(1, planned - done)
    epochs = round(left / steps_per_epoch, 4)
    note = (f"the probe's winner continues: its {done} steps count toward the {planned} "
            f"planned, {left} left ({epochs:g} epochs)")
    return _replan(cfg, recipe, epochs, steps_per_epoch), note


class BudgetCallback(TrainerCallback):
    """Stops training (after a last evaluation and save) when the deadline has passed."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() >= self.deadline and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_evaluate = True
            control.should_save = True
            control.should_training_stop = True
        return control


def _curve(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """[{step, train_loss?, val_loss?}] from Trainer's log history, one record per step."""
    by_step: dict[int, dict[str, Any]] = {}
    for rec in history:
        step = int(rec.get("step", 0))
        if "loss" in rec:
            by_step.setdefault(step, {"step": step})["train_loss"] = round(float(rec["loss"]), 5)
        if "eval_loss" in rec:
            by_step.setdefault(step, {"step": step})["val_loss"] = round(
                float(rec["eval_loss"]), 5)
    return [by_step[s] for s in sorted(by_step)]


def _kept_reason(curve: list[dict[str, Any]], best: int | None, last: int) -> str:
    vals = [(c["step"], c["val_loss"]) for c in curve if "val_loss" in c]
    if best is None or not vals:
        return f"the last step ({last}): no validation split to choose by"
    best_loss = min(v for _, v in vals)
    last_step, last_loss = vals[-1]
    if best == last_step:
        return (f"step {best}: the lowest validation loss ({best_loss:.4f}) of {len(vals)} "
                "evaluations, at the end of the run")
    return (f"step {best}: the lowest validation loss ({best_loss:.4f}) of {len(vals)} "
            f"evaluations; the last (step {last_step}) had {last_loss:.4f}")


def _sayer(enabled: bool):
    from rich.console import Console

    console = Console(stderr=True, highlight=False)

    def say(text: str) -> None:
        if enabled:
            console.print(text, markup=False)
    return say


def say_recipe(say: Any, recipe: Recipe, probe: dict[str, Any] | None) -> None:
    say("recipe (auto unless given; an explicit flag wins):")
    for k in ("epochs", "lr", "batch_size", "r", "alpha", "dropout", "eval_steps", "patience"):
        if k in recipe.values:
            say(f"  {k:<11} {recipe.values[k]!s:<8} {recipe.reasons.get(k, '')}")
    for note in recipe.notes:
        say(f"  note: {note}")


def _best_step(checkpoint: str | None) -> int | None:
    if not checkpoint:
        return None
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[-1])
    except ValueError:
        return None


def _val_exact_match(model: Any, tokenizer: Any, val: list[Example], cfg: TrainConfig
                     ) -> dict[str, Any]:
    """Exact-match of greedy completions on (at most 64 of) the validation split."""
    from loraplex.trainer.evaluate import evaluate, max_completion_tokens

    subset = val[:MAX_EM_EXAMPLES]
    res = evaluate(model, tokenizer, subset,
                   max_new_tokens=max_completion_tokens(tokenizer, subset, cfg.eval_max_new_tokens),
                   max_seq_len=cfg.max_seq_len)
    return {"val_exact_match": res.exact_match, "val_exact_match_n": res.n}
