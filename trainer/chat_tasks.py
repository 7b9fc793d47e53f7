"""The demo's three tenant tasks on a real instruct base (SmolLM2-135M-Instruct), as chat rows.

    python -m loraplex.trainer.chat_tasks ./data   # acme.train.jsonl, acme.test.jsonl, … + train.yaml

- `acme` routes a support ticket to a desk, a one-word answer:
      "Hi, I was charged twice for my plan this month. Thanks, Ana"      -> "BILLING"
- `globex` pulls fields out of a support email into a fixed JSON shape:
      "Hello, order GX-40213 came today but the kettle is cracked. …"    ->
      '{"order": "GX-40213", "item": "kettle", "action": "replace"}'
- `initech` rewrites a release note into its house changelog style:
      "We fixed the crash when uploading photos on Android."            ->
      "fix(android): crash when uploading photos"

The user turn is the ticket, email or note as a customer or engineer wrote it, with no
instruction: what to do with it is what the tenant's adapter learns. The base answers each
one helpfully in prose, so it scores 0 exact-match zero-shot, and each adapter answers in its
own tenant's shape, which no other task accepts (a desk name, a JSON object, a changelog
line), so an adapter cannot help another tenant's task. Exact-match is the whole answer
(stripped), so a half-right JSON object or a changelog line with the wrong scope is a miss.

The generators are seeded and the held-out split shares no user turn with training. Why
these shapes: each answer is decided by a few words of the input (a desk keyword, a refund
or replace phrase, a verb and a platform) plus spans copied from it (order id, item,
subject), which a 135M instruct model already copies well; a LoRA learns the mapping from a
couple of hundred rows in about two minutes of CPU training (docs/demo.md).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from loraplex.trainer.tasks import TENANTS, as_chat, write_jsonl

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon",
         "Kemal", "Lena", "Marco", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara")
GREETINGS = ("Hi,", "Hello,", "Hi team,", "Good morning,", "Hey,", "Dear support,")
SIGN_OFFS = ("Thanks, {n}", "Regards, {n}", "Cheers, {n}", "{n}", "Thank you! {n}")

# acme: what the customer writes decides the desk
DESK_ISSUES: dict[str, tuple[str, ...]] = {
    "BILLING": ("I was charged twice for my plan this month", "my invoice shows the wrong amount",
                "please refund the extra fee on my card", "why did my subscription price go up",
                "I need a copy of last month's invoice", "my payment was declined but money left my account",
                "can I change the card you bill", "I was billed after I cancelled"),
    "SHIPPING": ("my parcel has not arrived yet", "the tracking number shows no updates",
                 "the box was delivered to the wrong address", "can you send it by express delivery",
                 "the courier left my package in the rain", "when will my order ship",
                 "the delivery is a week late", "I want to change the delivery address"),
    "TECH": ("the app crashes when I open settings", "I cannot log in after the update",
             "the sync keeps failing with an error", "the page is blank on my phone",
             "the export button does nothing", "I get a timeout when uploading files",
             "notifications stopped working", "the search returns no results"),
    "ACCOUNT": ("I want to delete my account", "please change the email on my profile",
                "how do I add a second user to my team", "I forgot my username",
                "can you merge my two accounts", "I want to close my account for good",
                "please update my company name", "how do I transfer ownership of the workspace"),
}
CLOSERS = ("", " Can you help?", " Please look into it.", " This is urgent.",
           " Thanks in advance.", " What should I do?")


def acme_example(rng: random.Random) -> dict[str, str]:
    desk = rng.choice(sorted(DESK_ISSUES))
    issue = rng.choice(DESK_ISSUES[desk])
    name = rng.choice(NAMES)
    text = (f"{rng.choice(GREETINGS)} {issue}.{rng.choice(CLOSERS)} "
            f"{rng.choice(SIGN_OFFS).format(n=name)}")
    return {"prompt": text, "completion": desk}


# globex: order id and item are copied, the action is read from the wording
ITEMS = ("kettle", "toaster", "lamp", "blender", "chair", "desk", "monitor", "keyboard",
         "backpack", "jacket", "speaker", "headphones", "mug", "clock", "fan", "heater",
         "mixer", "router", "camera", "printer")
ACTIONS: dict[str, tuple[str, ...]] = {
    "refund": ("I would like my money back", "please refund me", "I want a refund",
               "I'd rather have the money returned"),
    "replace": ("please send me a new one", "I would like a replacement",
                "can you swap it for a working one", "please replace it"),
    "cancel": ("please cancel the order", "I no longer want it, cancel it",
               "stop the order please", "I want to cancel"),
}
PROBLEMS = ("arrived broken", "is cracked", "does not turn on", "is the wrong colour",
            "is missing a part", "stopped working after a day", "is not what I ordered")


def globex_example(rng: random.Random) -> dict[str, str]:
    order = f"GX-{rng.randrange(10000, 100000)}"
    item, action = rng.choice(ITEMS), rng.choice(sorted(ACTIONS))
    wish = rng.choice(ACTIONS[action])
    first = (f"my order {order} came today but the {item} {rng.choice(PROBLEMS)}"
             if rng.random() < 0.5 else
             f"the {item} from order {order} {rng.choice(PROBLEMS)}")
    text = (f"{rng.choice(GREETINGS)} {first}. {wish[0].upper() + wish[1:]}. "
            f"{rng.choice(SIGN_OFFS).format(n=rng.choice(NAMES))}")
    answer = json.dumps({"order": order, "item": item, "action": action})
    return {"prompt": text, "completion": answer}


# initech: verb -> type, platform -> scope, the subject is copied
VERBS: dict[str, tuple[str, ...]] = {
    "fix": ("fixed", "resolved", "repaired"),
    "feat": ("added", "introduced", "shipped"),
    "perf": ("sped up", "optimized"),
}
PLATFORMS = {"Android": "android", "iOS": "ios", "the web app": "web", "Windows": "windows",
             "macOS": "macos"}
SUBJECTS = ("the crash when uploading photos", "dark mode in settings", "the login screen",
            "offline sync", "the search page", "push notifications", "the checkout flow",
            "image caching", "the onboarding tour", "two-factor sign-in", "the export to PDF",
            "the invoice list", "video playback", "the profile editor", "file previews",
            "the calendar view", "shared folders", "the map screen", "voice notes",
            "the password reset email")
OPENERS = ("We", "This week we", "Today we", "The team", "In this release we")


def initech_example(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(sorted(VERBS))
    platform = rng.choice(sorted(PLATFORMS))
    subject = rng.choice(SUBJECTS)
    text = f"{rng.choice(OPENERS)} {rng.choice(VERBS[kind])} {subject} on {platform}."
    return {"prompt": text, "completion": f"{kind}({PLATFORMS[platform]}): {subject.removeprefix('the ')}"}


GENERATORS: dict[str, Callable[[random.Random], dict[str, str]]] = {
    "acme": acme_example, "globex": globex_example, "initech": initech_example,
}
TENANT_ADAPTERS = {"acme": "acme/router", "globex": "globex/extract", "initech": "initech/changelog"}

# What the demo sets on the real base (written as `train.yaml` beside the data): no
# hyper-parameter (epochs, lr, batch, rank are chosen by `recipe.py` from the data and the
# base; the compute dtype by `loraplex.compute`, docs/compute.md), only the unquantized base for
# training (the server quantizes to nf4 itself), a sequence cap above the longest row (~90
# tokens) and a time budget per adapter so the demo's three trainings stay bounded.
REAL_TRAIN_CONFIG: dict[str, object] = {
    "quantization": "none", "max_seq_len": 128, "eval_max_new_tokens": 32,
    "logging_steps": 5, "budget": "2.5m",
}


def make_split(tenant: str, *, seed: int = 0, n_train: int = 200, n_test: int = 40
               ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test); no user turn appears in both."""
    gen, rng = GENERATORS[tenant], random.Random(f"loraplex-chat-task:{tenant}:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for _ in range(50 * (n_train + n_test)):
        if len(rows) == n_train + n_test:
            break
        ex = gen(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            rows.append(ex)
    if len(rows) < n_train + n_test:
        raise ValueError(f"{tenant}: only {len(rows)} distinct examples available")
    return rows[n_test:], rows[:n_test]


def write_tasks(out_dir: str | Path, *, seed: int = 0, n_train: int = 200, n_test: int = 40,
                tenants: tuple[str, ...] = TENANTS) -> dict[str, dict[str, Path]]:
    """`<tenant>.train.jsonl` / `<tenant>.test.jsonl` chat rows per tenant, and `train.yaml`
    (the recipe) beside them; returns the paths."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {}
    for tenant in tenants:
        train, test = make_split(tenant, seed=seed, n_train=n_train, n_test=n_test)
        paths[tenant] = {"train": out / f"{tenant}.train.jsonl",
                         "test": out / f"{tenant}.test.jsonl"}
        write_jsonl(paths[tenant]["train"], [as_chat(r) for r in train])
        write_jsonl(paths[tenant]["test"], [as_chat(r) for r in test])
    (out / "train.yaml").write_text(yaml.safe_dump(REAL_TRAIN_CONFIG, sort_keys=False))
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=40)
    a = ap.parse_args(argv)
    for tenant, p in write_tasks(a.out_dir, seed=a.seed, n_train=a.n_train,
                                 n_test=a.n_test).items():
        print(f"{tenant}: {p['train']} {p['test']}")


if __name__ == "__main__":
    main()
