"""Publishing a trained adapter: lineage, push, and the promotion gate.

The version is always pushed (it is immutable and content-addressed: pushing costs nothing
if it already exists). Moving an alias is a separate decision taken by a gate:

    --gate "val_loss<=0.35"        an explicit threshold on one of the run's metrics
    (no --gate)                    better validation loss than the version the alias points
                                   at now, both measured here on the same validation data

A failed gate leaves the alias where it was and says why; the alias move itself is
compare-and-set against the version the gate compared with, so a concurrent move is never
overwritten silently.
"""

from __future__ import annotations

import operator
import platform
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from loraplex.errors import AliasConflict, InvalidArgument, NotFound, quote
from loraplex.trainer.config import TrainConfig
from loraplex.trainer.data import Example

_GATE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)\s*$")
_OPS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt,
        ">": operator.gt}
_LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "loraplex")


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    reason: str
    compared_with: int | None = None  # the alias's version at decision time (None: unset)


def parse_gate(text: str) -> Gate:
    m = _GATE.match(text)
    if not m:
        raise InvalidArgument(f"gate {quote(text)} must look like 'val_loss<=0.5' (metric, one of "
                              f"{' '.join(_OPS)}, number)", field="gate")
    return Gate(metric=m.group(1), op=m.group(2), value=float(m.group(3)))


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def build_lineage(cfg: TrainConfig, metrics: dict[str, Any], splits: Any,
                  base_fingerprint: Any, compute: dict[str, Any] | None = None,
                  report: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to know where an adapter came from and to train it again.
    `compute`: the training's `ComputeChoice.record()` (the dtype it ran in and why);
    `report` (train.TrainResult.report): the recipe and why, the learning-rate probe, the
    loss curve and the kept checkpoint."""
    ds = splits.dataset
    dataset: dict[str, Any] = {
        "path": str(cfg.data), "digest": ds.digest, "examples": len(ds.examples),
        # prompt_completion: trained on the prompt as written; messages: in the chat template
        "format": ds.format,
        "train_examples": len(splits.train), "val_examples": len(splits.val),
    }
    if splits.val_dataset is not None:
        dataset["val_path"] = str(cfg.val_data)
        dataset["val_digest"] = splits.val_dataset.digest
    return {
        "producer": "loraplex.trainer",
        "dataset": dataset,
        "base": {"digest": base_fingerprint.digest, "architecture": base_fingerprint.architecture,
                 "path": str(cfg.base)},
        "hyperparameters": cfg.hyperparameters(),
        "compute": compute or {},
        "seed": cfg.seed,
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "wall_s": metrics.get("wall_s"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "libraries": library_versions(),
        **({} if not report else {
            "recipe": {**report.get("recipe", {}), "probe": report.get("probe")},
            "curve": report.get("curve", []),
            "checkpoint": report.get("checkpoint"),
        }),
    }


def open_registry(location: str | None):
    """`--registry` > `$LORAPLEX_REGISTRY` > the registry's default local directory."""
    import os

    from loraplex.registry import DEFAULT_LOCATION, Registry

    return Registry.open(location or os.environ.get("LORAPLEX_REGISTRY") or DEFAULT_LOCATION)


def caller_identity(registry: Any):
    """`$LORAPLEX_TOKEN` when set (acts as that tenant/admin), else the local operator."""
    import os

    from loraplex.registry import Identity

    token = os.environ.get("LORAPLEX_TOKEN")
    return registry.authenticate(token) if token else Identity.system()


def _val_loss_of(registry: Any, identity: Any, version: Any, cfg: TrainConfig,
                 val: list[Example]) -> float:
    """Load a stored version on the training base and measure its validation loss."""
    from peft import PeftModel

    from loraplex.trainer.evaluate import completion_loss
    from loraplex.trainer.model import load_base

    with tempfile.TemporaryDirectory(prefix="loraplex-gate-") as tmp:
        path = registry.pull(identity, version.ref, Path(tmp) / "adapter")
        model, tok = load_base(cfg.base, cfg)
        model = PeftModel.from_pretrained(model, str(path))
        model.eval()
        return completion_loss(model, tok, val, max_seq_len=cfg.max_seq_len)


def decide_gate(registry: Any, identity: Any, cfg: TrainConfig, new: Any,
                metrics: dict[str, Any], val: list[Example]) -> GateOutcome:
    """Apply `cfg.gate` (or the default comparison) to the freshly pushed version `new`."""
    alias = cfg.promote
    try:
        current = registry.aliases(identity, new.key).get(alias)
    except NotFound:
        current = None
    if cfg.gate:
        g = parse_gate(cfg.gate)
        if g.metric not in metrics or metrics[g.metric] is None:
            have = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, int | float)))
            raise InvalidArgument(f"gate metric {quote(g.metric)} is not measured by this run; "
                                  f"available: {have}", field="gate")
        ok = _OPS[g.op](float(metrics[g.metric]), g.value)
        why = f"{g.metric}={float(metrics[g.metric]):.6g} {'meets' if ok else 'fails'} {g}"
        return GateOutcome(ok, why, current)
    if current is None:
        return GateOutcome(True, f"alias {quote(alias)} does not exist yet", None)
    if current == new.version:
        return GateOutcome(True, f"alias {quote(alias)} already points at v{new.version}", current)
    if not val:
        return GateOutcome(False, "no validation data to compare with the current version; "
                                  "pass --gate", current)
    old = registry.resolve(identity, f"{new.key}:v{current}")
    if old.base.digest != new.base.digest:
        return GateOutcome(False, f"{old.ref} was trained on another base; pass --gate",
                           current)
    new_loss = _val_loss_of(registry, identity, new, cfg, val)
    old_loss = _val_loss_of(registry, identity, old, cfg, val)
    ok = new_loss < old_loss
    why = (f"val_loss {new_loss:.6g} {'<' if ok else '>='} {old_loss:.6g} of {old.ref} "
           f"(same {len(val)} validation examples)")
    return GateOutcome(ok, why, current)


@dataclass(frozen=True)
class Published:
    version: Any  # AdapterVersion
    promoted: bool
    gate: GateOutcome | None


def publish(cfg: TrainConfig, adapter_dir: Path, metrics: dict[str, Any], splits: Any,
            compute: dict[str, Any] | None = None,
            report: dict[str, Any] | None = None) -> Published:
    """Push the adapter with its lineage; move `cfg.promote` if the gate passes.
    `compute` and `report`: `TrainResult.compute` and `.report`, recorded in the lineage."""
    from loraplex.fingerprint import fingerprint_base

    base_fp = fingerprint_base(cfg.base)
    lineage = build_lineage(cfg, metrics, splits, base_fp, compute, report)
    registry = open_registry(cfg.registry)
    try:
        identity = caller_identity(registry)
        version = registry.push(identity, adapter_dir, cfg.name, base=base_fp,
                                lineage=lineage)
        if not cfg.promote:
            return Published(version, False, None)
        outcome = decide_gate(registry, identity, cfg, version, metrics, splits.val)
        if not outcome.passed:
            return Published(version, False, outcome)
        if outcome.compared_with == version.version:
            return Published(version, True, outcome)
        try:
            registry.set_alias(identity, version.ref, cfg.promote,
                               expected=outcome.compared_with)
        except AliasConflict as e:
            return Published(version, False, GateOutcome(
                False, f"alias {quote(cfg.promote)} moved while gating: {e}",
                outcome.compared_with))
        return Published(version, True, outcome)
    finally:
        registry.close()
