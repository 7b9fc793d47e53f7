"""The learning-rate probe: a few steps at each candidate rate, scored on the validation split.

    out = probe_lr(model, train_rows, val_rows, lr=1e-3, batch_size=8, seed=0, pad_id=0,
                   planned=138, gain=4e-4, say=print, keep_winner=True)
    out.record["chosen"]     # 3e-3
    out.record["converged"]  # True: the winner's validation loss is below `gain`
    out.optimizer            # the winner's AdamW, its state intact, for the run to go on with

Every candidate starts from the same initial adapter (only the LoRA factors are saved and
restored, never the base). The highest rate runs first: it is the one that can learn an
easy task within the probe, and a candidate whose validation loss falls below `gain` (the
least drop the early stop counts, `recipe.min_gain`) ends the probe, since no later point
of any run could count as a gain over it. The rate below the rule's runs only when the
rule's rate did not halve the initial validation loss (`recipe.needs_lower`). With
`keep_winner`, the adapter and the optimizer state the winner's probe left are where the run
goes on (its steps count toward the run); otherwise the adapter is put back as it was.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

from loraplex.trainer.data import pad_batch
from loraplex.trainer.loss import completion_loss_sum
from loraplex.trainer.recipe import (
    converged,
    needs_lower,
    pick_probe,
    probe_candidates,
    probe_steps,
)

PROBE_VAL_ROWS = 64
PROBE_MIN_STEPS = 3  # fewer steps per rate do not separate the candidates' losses
PROBE_SHARE = 0.25  # of --budget, at most, for the learning-rate probe


@dataclass
class ProbeOutcome:
    record: dict[str, Any]  # JSON-ready: what was tried, the scores, the choice and why
    optimizer: Any | None = None  # the winner's optimizer when its adapter goes on training


def rows_loss(model: Any, rows: list[dict[str, list[int]]], pad_id: int,
              batch_size: int) -> float:
    """Token-weighted mean loss on encoded rows (the labels decide which tokens count)."""
    import torch

    dev = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            b = {k: v.to(dev) for k, v in pad_batch(rows[i:i + batch_size], pad_id).items()}
            loss, n = completion_loss_sum(model, b["input_ids"], b["attention_mask"],
                                          b["labels"])
            total += float(loss)
            count += int(n)
    return total / count if count else math.nan


def probe_lr(model: Any, train_rows: list[dict[str, list[int]]],
             val_rows: list[dict[str, list[int]]], *, lr: float, batch_size: int, seed: int,
             pad_id: int, planned: int, gain: float, say: Any, seconds: float | None = None,
             keep_winner: bool = False) -> ProbeOutcome:
    """Score the candidates around `lr` (`probe_candidates`), highest first, and leave the
    adapter as the winner's probe trained it (`keep_winner`) or as it was. `seconds`: the
    share of the budget the probe may use; the step count shrinks to fit once the first two
    steps are timed, and a share too small for `PROBE_MIN_STEPS` skips the probe."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    init = _snapshot(params)
    candidates = probe_candidates(lr)
    steps = probe_steps(planned)
    val = val_rows[:PROBE_VAL_ROWS]
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    dev = next(iter(params.values())).device
    scores: dict[float, float] = {}
    losses: dict[float, list[float]] = {}  # rate -> its training losses, step by step
    tokens: dict[float, int] = {}  # rate -> the non-padding tokens it trained on
    trained: dict[float, tuple[dict[str, Any], Any]] = {}  # rate -> (adapter, optimizer)
    step_s: list[float] = []
    t0 = time.perf_counter()
    start = rows_loss(model, val, pad_id, batch_size)  # the initial adapter's
    skipped: list[float] = []
    for rate in sorted(candidates, reverse=True):
        if rate < lr and not needs_lower(scores.get(lr), start):
            skipped.append(rate)
            continue
        _restore(params, init)
        opt = torch.optim.AdamW(params.values(), lr=rate, weight_decay=0.0)
        model.train()
        losses[rate], tokens[rate] = [], 0
        for s in range(steps):
            if seconds is not None and len(step_s) == 2:  # timed: fit the rest
                per = max(step_s) + 1e-9
                affordable = int(seconds / len(candidates) / per)
                if affordable < PROBE_MIN_STEPS:
                    _restore(params, init)
                    return _skipped(lr, candidates, per, t0, (
                        f"no learning-rate probe: its share of the budget ({seconds:.0f}s) "
                        f"buys {affordable} of the {PROBE_MIN_STEPS} steps per rate it needs "
                        f"at {per:.1f}s/step; the rule's {lr:.1e} is kept"))
                steps = min(steps, affordable)
            if s >= steps:
                break
            ts = time.perf_counter()
            for group in opt.param_groups:  # linear warm-up over the first quarter
                group["lr"] = rate * min(1.0, (s + 1) / max(1, steps // 4))
            idx = [order[(s * batch_size + j) % len(order)] for j in range(batch_size)]
            b = {k: v.to(dev) for k, v in
                 pad_batch([train_rows[i] for i in idx], pad_id).items()}
            loss, n = completion_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
            mean = loss / n.clamp(min=1)
            mean.backward()
            losses[rate].append(float(mean.detach()))
            tokens[rate] += int(b["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - ts)
        scores[rate] = rows_loss(model, val, pad_id, batch_size)
        say(f"  probe lr {rate:.1e}: val loss {scores[rate]:.4f} after {steps} steps")
        if keep_winner:
            trained[rate] = (_snapshot(params), opt)
        if converged(scores[rate], gain):
            break
    chosen = pick_probe(scores, lr)
    if not math.isfinite(scores.get(chosen, math.nan)):
        trained.clear()  # the rule's rate kept without a finite score: start afresh
    adapter, optimizer = trained.get(chosen, (init, None))
    _restore(params, adapter)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["lr"] = chosen  # warm-up done: the run's schedule starts from the rate
    model.train()
    done = converged(scores.get(chosen, math.nan), gain)
    return ProbeOutcome(record={
        "candidates": candidates, "steps": steps, "val_loss": scores, "prior": lr,
        "chosen": chosen, "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_step": sorted(step_s)[len(step_s) // 2],  # median: first steps warm up
        "reason": _reason(candidates, steps, scores, lr, chosen, gain, done, start, skipped),
        "start_loss": start, "not_tried": skipped,
        "train_loss": {r: v[-1] for r, v in losses.items() if v},
        "train_loss_mean": {r: sum(v) / len(v) for r, v in losses.items() if v},
        "tokens": tokens,
        "continued": steps if optimizer is not None else 0,
        "converged": bool(done and optimizer is not None)}, optimizer=optimizer)


def _reason(candidates: list[float], steps: int, scores: dict[float, float], prior: float,
            chosen: float, gain: float, done: bool, start: float, skipped: list[float]) -> str:
    tried = ", ".join(f"{r:.1e}: {v:.4f}" for r, v in sorted(scores.items()))
    text = (f"probe: {len(scores)} of {len(candidates)} rates x {steps} steps on the training "
            f"data, highest first, val loss {start:.4f} -> {tried}; the rule's {prior:.1e}"
            + (" held" if chosen == prior else f" lost to {chosen:.1e}"))
    if skipped:
        text += (f"; {', '.join(f'{r:.1e}' for r in skipped)} not tried: the rule's rate "
                 "halved the loss (a stall at it gets the early stop's rate cut)")
    if done:
        text += (f"; {chosen:.1e} reached a loss below {gain:.1e}, the least gain the early "
                 "stop counts, so nothing is left to learn")
    return text


def _skipped(prior: float, candidates: list[float], per_step: float, t0: float,
             reason: str) -> ProbeOutcome:
    """The answer when the budget cannot pay for a probe: the rule's rate, and the step time
    measured on the way (the budget still needs it)."""
    return ProbeOutcome(record={
        "candidates": candidates, "steps": 0, "val_loss": {}, "prior": prior, "chosen": prior,
        "seconds": round(time.perf_counter() - t0, 3), "seconds_per_step": per_step,
        "reason": reason, "skipped": True, "continued": 0, "converged": False,
        "not_tried": []})


def _snapshot(params: dict[str, Any]) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in params.items()}


def _restore(params: dict[str, Any], values: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
