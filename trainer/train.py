"""A training run: data -> LoRA on a (quantized) base -> best adapter on disk, with metrics.

Built on `transformers.Trainer`, which already does the parts that are easy to get subtly
wrong: warm-up schedules, gradient accumulation, DDP under `torchrun`, and checkpoints that
hold optimizer, scheduler and RNG state (what makes `--resume` end at the same digest as an
uninterrupted run). This module only decides the configuration and collects the results.

Run directory (`TrainConfig.run_dir`):

    checkpoint-<step>/     Trainer checkpoints (the latest and the best are kept)
    metrics.jsonl          every logged metric, one JSON object a line
    adapter/               the best weights in peft format: what gets published
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument
from loraplex.trainer.callbacks import MetricsFileCallback, RichProgressCallback, Throughput
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.data import (
    Dataset,
    Example,
    encode_dataset,
    load_jsonl,
    pad_batch,
    stop_ids,
)

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
    for name in ("metrics.jsonl", "adapter"):
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
    """Train, keep the best weights, save them under `run_dir/adapter`. No publishing."""
    import torch
    from transformers import EarlyStoppingCallback, Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback

    from loraplex.trainer.model import choose_compute, load_base, wrap_lora

    splits = load_splits(cfg)  # every data error surfaces before the model loads
    cuda = torch.cuda.is_available()
    args = _training_args(cfg, bool(splits.val), cuda)
    is_main = args.process_index == 0
    resume_from = _checkpoint_to_resume(cfg)
    if resume_from is None:
        _clear_stale_run(cfg, is_main)

    set_seed(cfg.seed)  # LoRA A matrices are drawn in get_peft_model: seed before it
    device = f"cuda:{args.local_process_index}" if cuda else "cpu"
    choice = choose_compute(cfg, device)
    log.info("training %s: %s", cfg.name, choice.line())
    if progress and is_main:
        print(f"train {cfg.name}: {choice.line()}", file=sys.stderr, flush=True)
    model, tokenizer = load_base(cfg.base, cfg, device=device, choice=choice)
    model = wrap_lora(model, cfg)
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))  # EOS + end-of-turn
    train_rows = _encode(tokenizer, splits.train, cfg, "training", stop)
    val_rows = _encode(tokenizer, splits.val, cfg, "validation", stop) if splits.val else None

    clock = Throughput()
    callbacks: list[Any] = [MetricsFileCallback(cfg.run_dir / "metrics.jsonl", clock),
                            RichProgressCallback(clock, enabled=progress)]
    if cfg.patience and val_rows is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    callbacks += extra_callbacks or []
    pad_id = tokenizer.pad_token_id
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows,
                      data_collator=lambda rows: pad_batch(rows, pad_id), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)

    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0

    adapter_dir = cfg.run_dir / "adapter"
    history = trainer.state.log_history
    metrics: dict[str, Any] = {
        # last logged loss; the run's mean when it ended before the first logging step
        "train_loss": _last(history, "loss") or float(out.training_loss),
        "train_loss_mean": float(out.training_loss),
        "val_loss": trainer.state.best_metric,
        "best_step": _best_step(trainer.state.best_model_checkpoint),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "wall_s": round(wall, 3),
        "tokens": clock.tokens,
        "tokens_per_s": round(clock.tokens / clock.elapsed, 2) if clock.elapsed else None,
        "world_size": args.world_size,
        "resumed_from_step": _best_step(resume_from),
    }
    if is_main:
        trainer.model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer_note = adapter_dir / "README.md"
        if tokenizer_note.exists():
            tokenizer_note.unlink()  # peft's generated model card: noise in the registry
    if splits.val and is_main:
        metrics.update(_val_exact_match(trainer.model, tokenizer, splits.val, cfg))
    return TrainResult(adapter_dir=adapter_dir, run_dir=cfg.run_dir, is_main=is_main,
                       metrics=metrics, splits=splits, compute=choice.record())


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
