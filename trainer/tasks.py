"""Three small tenant tasks that make specialization visible, generated deterministically.

    python -m loraplex.trainer.tasks ./data          # writes acme.train.jsonl, acme.test.jsonl, …
                                                    # (chat rows: {"messages": [user, assistant]})
    loraplex train --config ./data/train.yaml --base ./base --data ./data/acme.train.jsonl \
        --name acme/router                          # the automatic recipe (recipe.py)

- `acme` routes support tickets, answering the desk in upper case:
                                            "send the red bill"  -> "BILLING"
- `globex` tags the sentiment of a review:  "the red desk slow"  -> "negative"
- `initech` converts numbers to words:      "347"                -> "three hundred forty-seven"

Prompts carry no instruction: the task is what the tenant's adapter has learned. The base
(pre-trained to echo, see `pretrain.py`) scores ~0 exact-match on each task, and each
adapter scores ~0 on the other tenants' tasks (their answers come from disjoint sets), so
the gap the demo shows is the adapter's doing. Train and test splits are drawn without
overlap from one seeded stream.

Why labels rather than copy-and-transform tasks ("upper-case the text", "reverse the
words"): those need the tiny byte-level base to copy whole phrases character by character,
which 1,200 pre-training steps on 2 CPU cores do not teach reliably (both score 0%
held-out exact-match); a label decided by one keyword is learned by a LoRA in a minute.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

TENANTS = ("acme", "globex", "initech")

# Short, common words: byte-level tokens make every character cost a step, so keep it small.
WORDS = tuple(dict.fromkeys("""
the a an to of in on at for with from by and or but not all any new old big small red blue
green black white hot cold fast slow good bad open close send take give make find keep
read write call ship sell buy pay move stop run walk plan test fix help ask tell show box
car map cup key door room desk file note mail code data plan team user time day week
year home shop road city park tree fish bird dog cat sun moon star rain snow wind fire
book page line word name list card bill cash gold iron salt milk tea rice bread cake
""".split()))

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 9999, hyphenated tens ("forty-two"), no "and"."""
    if not 0 <= n <= 9999:
        raise ValueError(f"n must be in [0, 9999], got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
        return head if rest == 0 else head + " " + number_to_words(rest)
    thousands, rest = divmod(n, 1000)
    head = _ONES[thousands] + " thousand"
    return head if rest == 0 else head + " " + number_to_words(rest)


def random_number(rng: random.Random) -> int:
    """Mostly 0..999 with every magnitude represented (uniform would be 90% three-digit)."""
    digits = rng.choice((1, 2, 3, 3))
    return rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)


# acme's desks, each picked by one keyword of the ticket
DESKS: dict[str, tuple[str, ...]] = {
    "BILLING": ("bill", "cash", "pay", "card", "gold"),
    "SHIPPING": ("ship", "box", "mail", "road", "car"),
    "TECH": ("code", "data", "file", "key", "fix"),
    "SALES": ("buy", "sell", "shop", "cake", "milk"),
}
# globex's sentiment words; a review without one is "neutral"
SENTIMENT: dict[str, tuple[str, ...]] = {
    "positive": ("good", "fast", "new", "open", "help"),
    "negative": ("bad", "slow", "old", "close", "stop"),
}
_KEYWORDS = {w for ws in (*DESKS.values(), *SENTIMENT.values()) for w in ws}
FILLER = tuple(w for w in WORDS if w not in _KEYWORDS)


def _with_keyword(rng: random.Random, keyword: str | None) -> str:
    """2-4 filler words, then `keyword` (if any) as the last word.

    The deciding word comes last because the tiny byte-level base attends to recent tokens
    far more easily than to arbitrary positions: with the keyword anywhere, a demo-recipe
    LoRA reached 25-27% held-out exact-match on acme; with it last, 75% (same steps)."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 4))]
    if keyword is not None:
        words.append(keyword)
    return " ".join(words)


def acme_example(rng: random.Random) -> dict[str, str]:
    desk = rng.choice(sorted(DESKS))
    return {"prompt": _with_keyword(rng, rng.choice(DESKS[desk])), "completion": desk}


def globex_example(rng: random.Random) -> dict[str, str]:
    label = rng.choice(("positive", "negative", "neutral"))
    keyword = None if label == "neutral" else rng.choice(SENTIMENT[label])
    return {"prompt": _with_keyword(rng, keyword), "completion": label}


def initech_example(rng: random.Random) -> dict[str, str]:
    n = random_number(rng)
    return {"prompt": str(n), "completion": number_to_words(n)}


GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "acme": acme_example,
    "globex": globex_example,
    "initech": initech_example,
}


def make_split(tenant: str, *, seed: int = 0, n_train: int = 400, n_test: int = 50
               ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) for one tenant; no prompt appears in both (held-out means unseen)."""
    gen = GENERATORS[tenant]
    rng = random.Random(f"loraplex-task:{tenant}:{seed}")
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    # Numbers 0..999 give ~1000 distinct prompts: cap the attempts rather than loop forever.
    for _ in range(50 * (n_train + n_test)):
        if len(out) == n_train + n_test:
            break
        ex = gen(rng)
        if ex["prompt"] in seen:
            continue
        seen.add(ex["prompt"])
        out.append(ex)
    if len(out) < n_train + n_test:
        raise ValueError(f"{tenant}: only {len(out)} distinct examples available")
    return out[n_test:], out[:n_test]


def as_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A prompt/completion pair as a one-turn conversation: the demo trains and serves chat
    rows, so the base's chat template frames the task the same way in both."""
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": row["completion"]}]}


def from_chat(row: dict) -> dict[str, str]:
    """The (prompt, completion) pair of a one-turn chat row written by `write_tasks`."""
    user, reply = row["messages"][-2], row["messages"][-1]
    return {"prompt": user["content"], "completion": reply["content"]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# What the demo sets on the tiny embedded base (written as `train.yaml` beside the data): no
# hyper-parameter (epochs, lr, batch, rank are chosen by `recipe.py` from the data and the
# base), only fp32 on CPU (nf4 works too, slowly on CPU) and a sequence cap that fits the rows.
DEMO_TRAIN_CONFIG: dict[str, object] = {
    "quantization": "none", "max_seq_len": 128, "eval_max_new_tokens": 48,
}


def write_tasks(out_dir: str | Path, *, seed: int = 0, n_train: int = 400, n_test: int = 50,
                tenants: tuple[str, ...] = TENANTS) -> dict[str, dict[str, Path]]:
    """Write `<tenant>.train.jsonl` and `<tenant>.test.jsonl` (chat rows) per tenant; returns
    the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {}
    for tenant in tenants:
        train, test = make_split(tenant, seed=seed, n_train=n_train, n_test=n_test)
        paths[tenant] = {"train": out / f"{tenant}.train.jsonl", "test": out / f"{tenant}.test.jsonl"}
        write_jsonl(paths[tenant]["train"], [as_chat(r) for r in train])
        write_jsonl(paths[tenant]["test"], [as_chat(r) for r in test])
    import yaml

    (out / "train.yaml").write_text(yaml.safe_dump(DEMO_TRAIN_CONFIG, sort_keys=False))
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=50)
    a = ap.parse_args(argv)
    for tenant, p in write_tasks(a.out_dir, seed=a.seed, n_train=a.n_train, n_test=a.n_test).items():
        print(f"{tenant}: {p['train']} {p['test']}")


if __name__ == "__main__":
    main()
