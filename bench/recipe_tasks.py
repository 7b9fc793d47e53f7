"""Six small tasks of different kinds for judging training recipes, generated in code.

    from bench.recipe_tasks import TASKS, write_task
    write_task("lookup", out_dir, n_train=200, n_test=50)   # lookup.train.jsonl, lookup.test.jsonl

Each task is a seeded generator of chat rows; train and test share no user turn. The words
are short and common (the tiny base reads bytes, one character per token). Each task is
tagged `tune` or `held_out`: only the `tune` tasks may be looked at while changing the
constants of `loraplex.trainer.recipe`; the `held_out` ones are reported apart
(`bench/recipes.py`).

| task | kind | example |
|---|---|---|
| `classify` | classification | "the old ship lamb"                  -> "animal" |
| `extract` | extraction to a fixed format | "sam paid for order 4821 today" -> "id=4821" |
| `lookup` | lookup from the prompt | "a=cat b=sun c=map ? b"           -> "sun" |
| `rewrite` | rewrite to a house style | "red car"                        -> "RED-CAR" |
| `chat` | multi-turn chat | user "pet fox" / assistant "noted" / user "pet?" -> "fox" |
| `long_short` | long and short answers | "tea brief" -> "tea"; "tea full" -> "you asked for tea, here it is" |
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

WORDS = tuple("""
sun map cup key box car red hot old new big top pen ink jar bag hat bed log fan cap net
pot rug mat owl web gem ice oil tea art sky sea day fig nut ant bee oak elm ash bay dew
""".split())
FILLER = ("the", "a", "one", "old", "new", "big", "my", "our", "this", "that")
CATEGORIES = {
    "animal": ("lamb", "fox", "owl", "cat", "dog", "hen"),
    "food": ("bread", "rice", "cake", "fig", "plum", "soup"),
    "tool": ("saw", "drill", "nail", "axe", "file", "rake"),
}
NAMES = ("sam", "ana", "ben", "eve", "ian", "liz", "max", "zoe")


def classify(rng: random.Random) -> list[dict[str, str]]:
    label = rng.choice(sorted(CATEGORIES))
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))] + [rng.choice(WORDS)]
    words.append(rng.choice(CATEGORIES[label]))
    return _turn(" ".join(words), label)


def extract(rng: random.Random) -> list[dict[str, str]]:
    n = rng.randrange(100, 10000)
    text = rng.choice((f"{rng.choice(NAMES)} paid for order {n} today",
                       f"order {n} for {rng.choice(NAMES)} is late",
                       f"please ship order {n} now"))
    return _turn(text, f"id={n}")


def lookup(rng: random.Random) -> list[dict[str, str]]:
    keys = ("a", "b", "c")
    vals = rng.sample(WORDS, 3)
    ask = rng.choice(keys)
    table = " ".join(f"{k}={v}" for k, v in zip(keys, vals, strict=True))
    return _turn(f"{table} ? {ask}", vals[keys.index(ask)])


def rewrite(rng: random.Random) -> list[dict[str, str]]:
    words = rng.sample(WORDS, 2)
    return _turn(" ".join(words), "-".join(w.upper() for w in words))


def chat(rng: random.Random) -> list[dict[str, str]]:
    slot = rng.choice(("pet", "color", "city"))
    value = rng.choice(WORDS)
    return [{"role": "user", "content": f"{slot} {value}"},
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": f"{rng.choice(FILLER)} {slot}?"},
            {"role": "assistant", "content": value}]


def long_short(rng: random.Random) -> list[dict[str, str]]:
    word = rng.choice(WORDS) + " " + rng.choice(WORDS)
    if rng.random() < 0.5:
        return _turn(f"{word} brief", word)
    return _turn(f"{word} full", f"you asked for {word}, here it is")


def _turn(user: str, reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


# name -> (generator, kind, split of the suite)
TASKS: dict[str, tuple[Callable[[random.Random], list[dict[str, str]]], str, str]] = {
    "classify": (classify, "classification", "tune"),
    "extract": (extract, "extraction to a fixed format", "tune"),
    "lookup": (lookup, "lookup from the prompt", "tune"),
    "rewrite": (rewrite, "rewrite to a house style", "held_out"),
    "chat": (chat, "multi-turn chat", "held_out"),
    "long_short": (long_short, "long and short answers", "held_out"),
}


def make_split(task: str, *, seed: int = 0, n_train: int = 200, n_test: int = 50
               ) -> tuple[list[dict], list[dict]]:
    """(train, test) rows `{"messages": [...]}`; no conversation appears in both."""
    gen = TASKS[task][0]
    rng = random.Random(f"loraplex-recipe-task:{task}:{seed}")
    seen: set[str] = set()
    rows: list[dict] = []
    for _ in range(50 * (n_train + n_test)):
        if len(rows) == n_train + n_test:
            break
        msgs = gen(rng)
        key = json.dumps(msgs[:-1])
        if key not in seen:
            seen.add(key)
            rows.append({"messages": msgs})
    if len(rows) < n_train + n_test:
        raise ValueError(f"{task}: only {len(rows)} distinct examples")
    return rows[n_test:], rows[:n_test]


def write_task(task: str, out_dir: str | Path, *, seed: int = 0, n_train: int = 200,
               n_test: int = 50) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_split(task, seed=seed, n_train=n_train, n_test=n_test)
    paths = {"train": out / f"{task}.train.jsonl", "test": out / f"{task}.test.jsonl"}
    for key, rows in (("train", train), ("test", test)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
