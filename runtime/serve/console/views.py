"""Registry records as the console's pages show them: plain dicts and strings, no HTML.

Pure functions of records (no registry, no request): the templates and the JSON routes
both read these, so a page and its JSON never disagree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

FORMATS = {"prompt_completion": "prompt/completion", "messages": "chat"}


def size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def data_format(v: Any) -> str:
    """prompt/completion or chat, from the lineage's dataset; a derived version's from the
    version it came from ("" when nothing says)."""
    ds = (v.lineage or {}).get("dataset")
    if isinstance(ds, dict) and ds.get("format"):
        return FORMATS.get(str(ds["format"]), str(ds["format"]))
    fmt = (v.lineage or {}).get("format")
    return FORMATS.get(str(fmt), str(fmt)) if fmt else ""


def origin(v: Any) -> str:
    """How the version was made, in a word or two."""
    lin = v.lineage or {}
    if lin.get("inputs"):
        return str(lin.get("operation") or lin.get("method") or "derived")
    if isinstance(lin.get("dataset"), dict):
        return "trained"
    return "uploaded"


def version_dict(v: Any, aliases: dict[str, int] | None = None) -> dict[str, Any]:
    """What a page and the JSON routes say about one version."""
    fp = v.base
    return {
        "ref": v.ref, "tenant": v.tenant, "name": v.name, "version": v.version,
        "digest": v.digest, "size_bytes": v.size_bytes, "size": size(v.size_bytes),
        "rank": v.rank, "alpha": v.alpha, "use_rslora": v.use_rslora,
        "target_modules": list(v.target_modules), "dtype": v.dtype,
        "base": {"digest": fp.digest, "architecture": fp.architecture,
                 "layers": getattr(fp, "num_layers", None),
                 "hidden_size": getattr(fp, "hidden_size", None)},
        "created_at": v.created_at.isoformat(), "created": when(v.created_at),
        "created_by": v.created_by, "format": data_format(v), "origin": origin(v),
        "aliases": sorted(a for a, n in (aliases or {}).items() if n == v.version),
    }


def training_metrics(v: Any) -> dict[str, float]:
    """The numeric metrics the trainer recorded in the lineage (val_loss, …)."""
    m = (v.lineage or {}).get("metrics")
    if not isinstance(m, dict):
        return {}
    return {k: float(x) for k, x in m.items()
            if isinstance(x, int | float) and not isinstance(x, bool)
            and k not in ("wall_s", "tokens_per_s", "steps")}


def evaluation_dict(e: Any) -> dict[str, Any]:
    return {"version": e.version, "name": e.kind, "metrics": e.metrics,
            "data_digest": e.data_digest, "detail": e.detail,
            "passed": e.detail.get("passed") if isinstance(e.detail, dict) else None,
            "reason": e.detail.get("reason") if isinstance(e.detail, dict) else None,
            "created_at": e.created_at.isoformat(), "created": when(e.created_at),
            "created_by": e.created_by}


def scorecard(versions: list[Any], evaluations: list[Any]) -> dict[int, dict[str, float]]:
    """version -> {"<source>.<metric>": value}: the training metrics of its lineage
    (`train.val_loss`) and the latest value of every recorded evaluation
    (`eval@<data>.exact_match`, `gate.loss`), so two versions line up column by column."""
    card: dict[int, dict[str, float]] = {v.version: {f"train.{k}": x for k, x in
                                                     training_metrics(v).items()}
                                         for v in versions}
    for e in evaluations:  # oldest first: a later record of the same column wins
        data = f"@{e.data_digest.removeprefix('sha256:')[:8]}" if e.data_digest else ""
        for k, x in e.metrics.items():
            card.setdefault(e.version, {})[f"{e.kind}{data}.{k}"] = x
    return card


LOWER_IS_BETTER = ("loss", "perplexity", "error", "latency")


def compare(card: dict[int, dict[str, float]], a: int, b: int) -> list[dict[str, Any]]:
    """Rows of metric, a's value, b's value, b - a, and whether b is better."""
    ca, cb = card.get(a, {}), card.get(b, {})
    rows = []
    for key in sorted(set(ca) | set(cb)):
        va, vb = ca.get(key), cb.get(key)
        delta = None if va is None or vb is None else vb - va
        lower = any(w in key.rsplit(".", 1)[-1] for w in LOWER_IS_BETTER)
        better = None if not delta else (delta < 0) == lower
        rows.append({"metric": key, "a": va, "b": vb, "delta": delta, "better": better})
    return rows


def previous_targets(history: list[Any]) -> dict[str, int]:
    """alias -> the version it pointed at before its last move (what "roll back" restores);
    aliases created by their last move, or removed, have none."""
    out: dict[str, int] = {}
    for move in history:  # oldest first: the last move of each alias wins
        if move.from_version is not None and move.to_version is not None:
            out[move.alias] = move.from_version
        else:
            out.pop(move.alias, None)
    return out


def resident_dict(r: Any) -> dict[str, Any]:
    tier = "slot" if r.slot is not None else "host"
    return {"ref": r.ref, "digest": r.digest, "tier": tier, "slot": r.slot,
            "on_host": r.on_host, "pinned": r.pinned, "active_sequences": r.active_sequences,
            "size": size(r.size_bytes)}
