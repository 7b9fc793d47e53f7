"""The eval gate for derived versions (compressed, merged): measured before an alias moves.

    --gate "exact_match>=0.9*source"   at least 90% of the source's exact-match
    --gate "loss<=1.05*source"         at most 5% more loss than the source
    --gate "exact_match>=0.8"          a fixed threshold

Both the new version and its source(s) are scored here, with the trainer's own evaluation
(`evaluate.evaluate`: completion loss and greedy exact-match), on the same `--gate-data`
file and the same unquantized base. For a merge, "source" is the best of its inputs on that
data (the highest for >=/>, the lowest for <=/<): a merge must hold up against the best
adapter it replaces, not the weakest.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import InvalidArgument, quote
from loraplex.trainer.publish import _OPS

_GATE = re.compile(r"^\s*(?P<metric>exact_match|loss)\s*(?P<op><=|>=|<|>)\s*"
                   r"(?:(?P<factor>[0-9.eE+-]+)\s*\*\s*)?(?P<rhs>source|[0-9.eE+-]+)\s*$")
METRICS = ("exact_match", "loss")


@dataclass(frozen=True)
class DerivedGate:
    metric: str
    op: str
    value: float | None  # a fixed threshold, or None: relative to the source
    factor: float = 1.0  # the source's metric is multiplied by this

    def __str__(self) -> str:
        rhs = f"{self.value:g}" if self.value is not None else f"{self.factor:g}*source"
        return f"{self.metric}{self.op}{rhs}"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str  # one line
    new: dict[str, float]
    sources: dict[str, dict[str, float]]


def parse(text: str) -> DerivedGate:
    m = _GATE.match(text or "")
    if m is None:
        raise InvalidArgument(f"gate {quote(text)} must look like 'exact_match>=0.9*source', "
                              "'loss<=1.05*source' or 'exact_match>=0.8'", field="gate")
    try:
        if m["rhs"] == "source":
            return DerivedGate(m["metric"], m["op"], None, float(m["factor"] or 1.0))
        if m["factor"]:
            raise ValueError("a factor needs 'source'")
        return DerivedGate(m["metric"], m["op"], float(m["rhs"]))
    except ValueError as e:
        raise InvalidArgument(f"gate {quote(text)}: {e}", field="gate") from None


def score(reg: Any, identity: Any, ref: str, base_dir: Path, examples: list[Any],
          max_new_tokens: int = 64) -> dict[str, float]:
    """Loss and exact-match of one stored version on `examples` (fp32, unquantized base)."""
    from peft import PeftModel

    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.evaluate import evaluate, max_completion_tokens
    from loraplex.trainer.model import load_base

    cfg = TrainConfig(base=str(base_dir), data="-", name="gate/gate", quantization="none",
                      compute_dtype="float32")
    with tempfile.TemporaryDirectory(prefix="loraplex-gate-") as tmp:
        path = reg.pull(identity, ref, Path(tmp) / "adapter")
        model, tok = load_base(base_dir, cfg)
        model = PeftModel.from_pretrained(model, str(path))
        res = evaluate(model, tok, examples,
                       max_new_tokens=max_completion_tokens(tok, examples, max_new_tokens))
    return {"exact_match": res.exact_match, "loss": res.loss}


def run_gate(reg: Any, identity: Any, gate: DerivedGate, new_ref: str, source_refs: list[str],
             data: Path, base_dir: Path, *, max_examples: int = 0) -> GateResult:
    """Score the new version (and, for a relative gate, its sources) and decide."""
    from transformers.utils import logging as hf_logging

    from loraplex.trainer.data import load_jsonl

    hf_logging.disable_progress_bar()  # the verdict is one line; no loading bars around it
    examples = load_jsonl(data).examples
    examples = examples[:max_examples] if max_examples > 0 else examples
    new = score(reg, identity, new_ref, base_dir, examples)
    got = new[gate.metric]
    sources: dict[str, dict[str, float]] = {}
    if gate.value is not None:
        threshold, against = gate.value, f"{gate.value:g}"
    else:
        for ref in source_refs:
            sources[ref] = score(reg, identity, ref, base_dir, examples)
        pick = max if gate.op in (">=", ">") else min
        best_ref = pick(sources, key=lambda r: sources[r][gate.metric])
        best = sources[best_ref][gate.metric]
        threshold = gate.factor * best
        against = f"{gate.factor:g}*{best:.4g} of {best_ref}"
    ok = bool(_OPS[gate.op](got, threshold))
    reason = (f"{new_ref}: {gate.metric}={got:.4g} {'meets' if ok else 'fails'} "
              f"{gate.metric}{gate.op}{against} (= {threshold:.4g}) on {len(examples)} "
              f"examples of {data}")
    return GateResult(ok, reason, new, sources)
