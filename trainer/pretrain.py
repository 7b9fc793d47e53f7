"""Brief, deterministic pre-training of the embedded base so that a LoRA learns in minutes.

A LoRA on a randomly initialised base must learn language *and* the task from a few hundred
examples; on CPU that takes many epochs. So `loraplex base build --size tiny|micro` runs this
short pre-training first (`default_pretrain` picks it; `loraplex.basemodel.build_base` takes it
as a hook, so the core does not import the trainer). It teaches generic skills through
explicit instructions on a generated corpus, in the embedded base's chat template
(`data.chat_prompt`, one user turn):

    "<words>"              -> "<words>"             echo (no instruction: the default)
    "upper: <words>"       -> "<WORDS>"             letter case
    "reverse: <words>"     -> "<words reversed>"    word boundaries and order
    "spell: <number>"      -> "<number in words>"   digits to words

Without an instruction the base echoes, so it scores ~0 exact-match on every tenant task of
`tasks.py` (prompts there carry no instruction); a tenant's adapter only has to learn to act
as if "its" instruction were present, which takes a LoRA a few hundred steps.

Deterministic: fixed corpus from `random.Random(seed)`, `torch.manual_seed(seed)`, CPU,
fp32, a plain torch loop (no Trainer: no data-loader workers, no hidden state, and it is
what the basemodel hook calls, before any trainer configuration exists). Same seed and
thread count -> byte-identical weights.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from loraplex.basemodel import PretrainFn
from loraplex.trainer.data import IGNORE_INDEX, chat_prompt, encode, pad_batch
from loraplex.trainer.tasks import WORDS, number_to_words, random_number


@dataclass(frozen=True)
class PretrainPlan:
    """How much pre-training a size gets. tiny: 1200 steps measured at 119 s on 2 shared
    cores (over the ≲90 s target; fewer steps = weaker copying, see the report); micro: seconds."""

    steps: int
    batch_size: int
    lr: float
    warmup: int


PLANS: dict[int, PretrainPlan] = {
    # keyed by hidden size: the base module knows sizes by name, this one by shape
    64: PretrainPlan(steps=40, batch_size=16, lr=3e-3, warmup=5),      # micro
    192: PretrainPlan(steps=1200, batch_size=16, lr=5e-3, warmup=30),  # tiny
}
MAX_SEQ_LEN = 96
MADE_UP_WORDS = 0.0  # share of random-letter words in phrases


def _phrase(rng: random.Random) -> str:
    """Task words mixed with made-up ones so echoing is learned as copying, not recall."""
    words = []
    for _ in range(rng.randint(1, 5)):
        if rng.random() < MADE_UP_WORDS:
            words.append("".join(rng.choice(string.ascii_lowercase)
                                 for _ in range(rng.randint(1, 7))))
        else:
            words.append(rng.choice(WORDS))
    return " ".join(words)


def corpus_example(rng: random.Random) -> tuple[str, str]:
    """One (prompt, completion) of the pre-training mix."""
    kind = rng.random()
    if kind < 0.40:
        p = rng.choice((_phrase(rng), str(random_number(rng))))
        return p, p
    if kind < 0.55:
        p = _phrase(rng)
        return f"upper: {p}", p.upper()
    if kind < 0.75:
        p = _phrase(rng)
        return f"reverse: {p}", " ".join(reversed(p.split()))
    n = random_number(rng) if rng.random() < 0.9 else rng.randrange(1000, 10000)
    return f"spell: {n}", number_to_words(n)


def _batches(tokenizer: Any, rng: random.Random, plan: PretrainPlan):
    """Fresh random batches every step (a mix of all skills in each batch)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _ in range(plan.steps):
        rows = []
        for _ in range(plan.batch_size):
            p, c = corpus_example(rng)
            # Loss on the prompt too: learning to model the words costs no extra compute.
            ids = tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": p}]),
                            add_special_tokens=False)["input_ids"]
            enc = encode(tokenizer, ids, c, max_seq_len=MAX_SEQ_LEN,
                         train_on_prompt=True)
            rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
        yield pad_batch(rows, pad)


def _lr_at(step: int, plan: PretrainPlan) -> float:
    """Warm-up, then constant, then a linear decay over the last 25% of steps (a constant
    rate gets through the copying "phase change" sooner than an early cosine decay)."""
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    decay_from = int(plan.steps * 0.75)
    if step < decay_from:
        return plan.lr
    return plan.lr * max(0.05, 1 - (step - decay_from) / max(1, plan.steps - decay_from))


def plan_for(model: Any) -> PretrainPlan:
    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0))
    if hidden in PLANS:
        return PLANS[hidden]
    # Unknown shape: scale the tiny plan down so a call never runs for long by surprise.
    return PretrainPlan(steps=100, batch_size=16, lr=1e-3, warmup=10)


def pretrain_base(model: Any, tokenizer: Any, seed: int, *, plan: PretrainPlan | None = None,
                  log: Any = None) -> None:
    """Pre-train `model` in place (fp32, CPU); `log(step, loss)` is called every step."""
    import torch

    plan = plan or plan_for(model)
    torch.manual_seed(seed)
    rng = random.Random(f"loraplex-pretrain:{seed}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.98),
                            weight_decay=0.01)
    for step, batch in enumerate(_batches(tokenizer, rng, plan)):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, plan)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log is not None:
            log(step, out.loss.item())
    model.eval()


def default_pretrain(size: str) -> PretrainFn | None:
    """The pre-training `loraplex base build --size SIZE` runs: `pretrain_base` for the
    `micro`/`tiny` bases; none for `bench`, whose timings need no trained weights."""
    return None if size == "bench" else pretrain_base


__all__ = ["IGNORE_INDEX", "PLANS", "PretrainPlan", "corpus_example", "default_pretrain",
           "pretrain_base"]
