"""The automatic recipe: hyper-parameters a user did not give, chosen from the data and the base.

    recipe = choose(DataStats(rows=243, mean_tokens=61.0, max_tokens=94),
                    BaseStats(params=134_515_008, architecture="llama", hidden=576, layers=30),
                    Compute(device="cpu", threads=2), given={"epochs": 3.0})
    recipe.values   # {"lr": 1e-3, "batch_size": 8, "r": 16, "alpha": 32.0, "epochs": 3.0, …}
    recipe.reasons  # {"lr": "1.0e-03 for a 135M-parameter base: …", "epochs": "given", …}

Pure: no torch, no files. `train.py` gathers the statistics, calls `choose`, runs the
learning-rate probe when `recipe.probe` says so (`probe_candidates`), and trims the run to
`--budget` (`fit_budget`). An explicit value (flag or YAML) always wins and is recorded as
"given".

Why these rules. QLoRA's recipe (r 8, lr 2e-4, batch 8-16, 1-3 epochs) is tuned for
billion-parameter bases and tens of thousands of rows; on a few hundred rows and a small base
it stops long before the task is learned (issue 20: SmolLM2-135M on 270 chat rows scores 18%
held-out exact-match with it, 94% with r 16 on every linear layer at lr 1e-3 for 3 epochs).
What a small task needs is enough optimizer *steps* at a learning rate that suits the base:

- learning rate falls with the base's size: 1e-3 at 135M parameters, scaled by
  (135M / params) ** 0.35 and clamped to [1e-4, 3e-3] (≈2.5e-4 at 7B, 1.2e-4 at 65B, the
  QLoRA values; 3e-3 for the tiny embedded base, what its demo was tuned to);
- steps: a target number of optimizer steps that falls with the base's size (a small base
  learns a new mapping more slowly), turned into whole epochs over the data and capped;
  a large dataset gets at least one epoch and at most three;
- batch 8 below 2,000 rows (more steps per epoch), 16 above; r 16, alpha 32 (scale 2) on
  every linear layer; no dropout (the run is short and the best checkpoint by validation
  loss is what gets published, which already guards against over-fitting);
- validation as often as it costs at most 15% of the training time (12 to 30 points per
  run), and an early stop (`stopping.py`) after 3 points without a gain (`min_gain`: a
  drop of the loss that raises a whole answer's probability by about 1%), once the rate
  has been cut to a third at the first such stall, or at once when the loss is below
  `min_gain` (`converged`: no later point could count as a gain): an easy task stops long
  before the step target, a hard one uses all of it.

The learning rate is the uncertain choice (a task can be harder or easier than the rule
assumes), so `train.py` measures it when the user did not give one: a few candidates around
the rule's value, each trained for a few steps from the same initial adapter, scored by
validation loss (`probe.py`: `probe_candidates`, `pick_probe`). When the run's length is the
recipe's own, the winner's adapter and optimizer state are where the run goes on and its
probe steps come off the plan; a winner that has converged is the run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from loraplex.errors import InvalidArgument, quote

# The fields `choose` fills when the user left them out (None in TrainConfig).
AUTO_FIELDS = ("lr", "epochs", "batch_size", "r", "alpha", "dropout", "val_fraction",
               "eval_steps", "patience")
REFERENCE_PARAMS = 135e6  # SmolLM2-135M: the base the reference lr (1e-3) was measured on
LR_AT_REFERENCE = 1e-3
LR_EXPONENT = 0.35
LR_RANGE = (1e-4, 3e-3)
STEPS_AT_REFERENCE = 120  # optimizer steps a 135M base needs on a small task (issue 20: ~90)
STEPS_EXPONENT = 0.45
STEPS_RANGE = (100, 600)
MAX_EPOCHS = 40
VAL_RANGE = (8, 200)  # validation rows carved from --data when none are given
EVALS_PER_RUN = 12  # validation points on the curve at least (checkpoints to choose from)
MAX_EVALS_PER_RUN = 30  # validation points at most, however cheap a pass is
EVAL_SHARE = 0.15  # of the training time, at most, spent validating
PATIENCE = 3  # validation points without improvement before the run stops early
# A validation point counts as an improvement for the early stop only when it raises the
# probability of a whole labelled answer by more than about this fraction (`min_gain`):
# smaller gains move no exact-match score, and a curve that creeps along at 1e-4 would
# otherwise spend the rest of the budget.
ANSWER_GAIN = 0.01


@dataclass(frozen=True)
class DataStats:
    """The training split after tokenization (what the chooser may look at)."""

    rows: int
    mean_tokens: float  # per row, prompt + completion
    max_tokens: int
    answer_tokens: float = 1.0  # labelled tokens per row, mean (the completion and its end)
    val_rows: int = 0  # the validation split's rows (0: unknown; validation is then spaced
    # by the run's length alone)


@dataclass(frozen=True)
class BaseStats:
    params: int
    architecture: str  # the base config's model_type ("llama", "qwen2", "gpt2", …)
    hidden: int
    layers: int


@dataclass(frozen=True)
class Compute:
    device: str  # "cpu" | "cuda"
    threads: int
    world_size: int = 1


@dataclass(frozen=True)
class Recipe:
    """The resolved values of `AUTO_FIELDS` (minus `val_fraction`, decided before the split),
    why each was chosen, and whether the learning rate should be measured."""

    values: dict[str, Any]
    reasons: dict[str, str]
    given: tuple[str, ...]
    probe: bool  # measure the learning rate before the full run
    target_steps: int
    notes: list[str] = field(default_factory=list)
    min_gain: float = ANSWER_GAIN  # the early stop's threshold on the validation loss
    val_rows: int = 0  # what `eval_every` weighs the cost of a validation point by

    def as_lineage(self) -> dict[str, Any]:
        return {"values": dict(self.values), "reasons": dict(self.reasons),
                "given": list(self.given), "target_steps": self.target_steps,
                "notes": list(self.notes), "min_gain": self.min_gain,
                "val_rows": self.val_rows}


def planned_steps(epochs: float, steps_per_epoch: int) -> int:
    """The optimizer steps `epochs` make, counted as the Trainer counts them (rounded up; a
    fraction like 6.6111 x 18 that floating point puts at 118.9998 is 119)."""
    return math.ceil(epochs * steps_per_epoch - 1e-6)


def eval_every(total_steps: int, val_rows: int = 0, batch_size: int = 8) -> int:
    """Steps between validation points: as often as validating costs at most `EVAL_SHARE`
    of the training time (a forward pass over `val_rows` costs about a third of a training
    step over as many rows), so that the early stop reacts within a few steps of the best
    point; at least `EVALS_PER_RUN` points over the run and at most `MAX_EVALS_PER_RUN`.
    Without `val_rows`, `EVALS_PER_RUN` points."""
    sparsest = max(1, math.ceil(total_steps / EVALS_PER_RUN))
    if val_rows <= 0:
        return sparsest
    densest = max(1, math.ceil(total_steps / MAX_EVALS_PER_RUN))
    cost = val_rows / (3 * max(1, batch_size))  # one validation pass, in training steps
    return max(densest, min(sparsest, math.ceil(cost / EVAL_SHARE - 1e-9)))


def converged(val_loss: float, gain: float) -> bool:
    """True when no later validation point can count as a gain for the early stop: the
    loss (never negative) is already below the least drop it counts (`min_gain`). The run
    stops there instead of spending its patience on points that cannot improve."""
    return math.isfinite(val_loss) and val_loss < gain


def min_gain(answer_tokens: float) -> float:
    """The least drop of the per-token validation loss that the early stop counts as a gain:
    `ANSWER_GAIN` spread over an answer's labelled tokens. A whole answer's loss is the
    per-token loss times its length, and exp(-d * L) ~ 1 - d * L, so a one-word label
    needs a larger per-token drop than a 25-token JSON answer for the same gain."""
    return ANSWER_GAIN / max(1.0, answer_tokens)


def validation_rows(rows: int) -> int:
    """How many rows to hold out when the user set neither --val-data nor --val-fraction:
    10% of the file, at least 8 (a loss on fewer is noise), at most 200 (validation is run
    every few steps; 200 rows measure a loss to a few per cent), and never more than a fifth."""
    n = max(VAL_RANGE[0], round(0.1 * rows))
    return max(1, min(n, VAL_RANGE[1], rows // 5)) if rows >= 5 else 0


def reference_lr(params: int) -> float:
    lr = LR_AT_REFERENCE * (REFERENCE_PARAMS / max(params, 1)) ** LR_EXPONENT
    return float(f"{min(max(lr, LR_RANGE[0]), LR_RANGE[1]):.1e}")


def target_steps(params: int) -> int:
    steps = STEPS_AT_REFERENCE * (REFERENCE_PARAMS / max(params, 1)) ** STEPS_EXPONENT
    return int(round(min(max(steps, STEPS_RANGE[0]), STEPS_RANGE[1]), -1))


def _size(params: int) -> str:
    if params >= 1e9:
        return f"{params / 1e9:.1f}B"
    if params >= 1e6:
        return f"{params / 1e6:.0f}M"
    return f"{params / 1e3:.0f}k"


def choose(data: DataStats, base: BaseStats, compute: Compute,
           given: dict[str, Any] | None = None) -> Recipe:
    """Fill every field of `AUTO_FIELDS` (except `val_fraction`) that `given` lacks."""
    if data.rows <= 0:
        raise InvalidArgument("no training rows to choose a recipe for", field="data")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    def put(name: str, value: Any, reason: str) -> None:
        if name in given:
            values[name], reasons[name] = given[name], "given"
        else:
            values[name], reasons[name] = value, reason

    size = _size(base.params)
    put("batch_size", 8 if data.rows < 2000 else 16,
        f"{data.rows} training rows: "
        + ("batch 8 for more optimizer steps per epoch" if data.rows < 2000 else
           "batch 16 (enough rows for full batches)"))
    per_device = values["batch_size"] * max(1, compute.world_size)
    steps_per_epoch = max(1, math.ceil(data.rows / per_device))
    steps = target_steps(base.params)
    epochs = min(MAX_EPOCHS, max(1, math.ceil(steps / steps_per_epoch)))
    if data.rows * 3 >= steps * per_device:  # a large dataset: its own epochs suffice
        epochs = min(epochs, 3)
    put("epochs", float(epochs),
        f"{steps_per_epoch} steps per epoch; a {size} base needs about {steps} steps on a "
        f"new task -> {epochs} epoch(s), {epochs * steps_per_epoch} steps")
    put("lr", reference_lr(base.params),
        f"{reference_lr(base.params):.1e} for a {size}-parameter base "
        f"(1e-3 at 135M, x (135M/params)^{LR_EXPONENT})")
    r = 32 if data.rows > 50_000 else 16
    put("r", r, f"rank {r} on every linear layer"
        + (" (over 50k rows: more capacity)" if r == 32 else
           " (the rank that learned small tasks where r 8 did not)"))
    put("alpha", float(2 * values["r"]), "2 x rank (LoRA scale 2, independent of the rank)")
    put("dropout", 0.0, "short run; the best checkpoint by validation loss guards against "
                        "over-fitting")
    total = int(values["epochs"] * steps_per_epoch)
    every = eval_every(total, data.val_rows, values["batch_size"])
    put("eval_steps", every,
        f"{math.ceil(total / every)} validation points over {total} steps"
        + (f" (a pass over {data.val_rows} validation rows costs under "
           f"{EVAL_SHARE:.0%} of the training between two)" if data.val_rows else ""))
    gain = min_gain(data.answer_tokens)
    put("patience", PATIENCE, f"{PATIENCE} validation points without lowering the loss by "
                              f"more than {gain:.1e} ({ANSWER_GAIN:.0%} of a "
                              f"{data.answer_tokens:.0f}-token answer's probability) cut the "
                              f"rate to a third, {PATIENCE} more stop the run; the published "
                              "checkpoint is the best one either way")
    notes = []
    probe = "lr" not in given and compute.world_size == 1
    if "lr" not in given and compute.world_size > 1:
        notes.append("no learning-rate probe under torchrun: every rank must agree")
    return Recipe(values=values, reasons=reasons, given=tuple(sorted(given)), probe=probe,
                  target_steps=steps, notes=notes, min_gain=gain, val_rows=data.val_rows)


# -- the learning-rate probe ------------------------------------------------------------------
PROBE_FACTORS = (1 / 3, 1.0, 3.0)


def probe_candidates(lr: float) -> list[float]:
    """The rule's value and one third / three times it, inside `LR_RANGE`. Not above it: on
    the tiny base a probe of 3 x 3e-3 won every time (its loss drops fastest in 30 steps),
    and the full runs at 9e-3 then had their best validation loss at the first evaluation
    and rose after it (bench.recipes, three tasks)."""
    lo, hi = LR_RANGE
    return sorted({float(f"{min(max(lr * f, lo), hi):.1e}") for f in PROBE_FACTORS})


def needs_lower(rule_loss: float | None, start_loss: float) -> bool:
    """Whether the probe tries the rate below the rule's: only when the rule's rate did not
    halve the validation loss it started from (or gave no finite loss). A rule rate that
    learns but levels off too high is what the early stop's rate cut is for
    (`stopping.py`), at no cost to the runs where it is not; the lower rate won on no task
    of bench.recipes' suite on SmolLM2 and cost a third of every probe."""
    if rule_loss is None or not math.isfinite(rule_loss):
        return True
    return not (math.isfinite(start_loss) and rule_loss < 0.5 * start_loss)


MIN_STEPS_TO_PROBE = 40  # a shorter run is not worth three trial runs


def probe_steps(total_steps: int) -> int:
    """Steps per candidate: enough for the losses to separate, a tenth of the run (the
    three candidates together cost under a third of it), 5 to 30."""
    return max(5, min(30, total_steps // 10))


def pick_probe(scores: dict[float, float], prior: float, tolerance: float = 0.02) -> float:
    """The candidate with the lowest validation loss; the rule's own value unless another
    is better by more than `tolerance` (relative): a short probe favours high learning
    rates (they drop the loss fastest early on), so the prior needs a margin to lose."""
    finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    if not finite:
        return prior
    best = min(finite, key=lambda lr: finite[lr])
    if prior in finite and finite[best] >= finite[prior] * (1 - tolerance):
        return prior
    return best


# -- the time budget ----------------------------------------------------------------------------
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$")


def parse_budget(text: str | float | int | None) -> float | None:
    """'90s' | '10m' | '1.5h' | a number of seconds -> seconds; None/'' -> no budget."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _BUDGET.match(text)
        if not m:
            raise InvalidArgument(f"budget {quote(text)} must look like 90s, 10m or 1.5h",
                                  field="budget")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds <= 0:
        raise InvalidArgument("budget must be > 0", field="budget")
    return seconds


def fit_budget(epochs: float, steps_per_epoch: int, seconds_per_step: float,
               left_s: float) -> tuple[float, str | None]:
    """Epochs that fit in `left_s` at the measured speed (15% kept for validation and
    saving); (epochs, None) when the planned run fits."""
    affordable = int(0.85 * left_s / max(seconds_per_step, 1e-9))
    planned = planned_steps(epochs, steps_per_epoch)
    if planned <= affordable:
        return epochs, None
    new = max(1, affordable) / steps_per_epoch
    new = float(f"{max(new, 1 / steps_per_epoch):.3g}")
    return new, (f"the budget leaves {left_s:.0f}s at {seconds_per_step:.2f}s/step: "
                 f"{planned} planned steps cut to {max(1, affordable)}")
