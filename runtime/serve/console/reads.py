"""What each console page reads from the registry and the engine, as plain dicts for the
templates and the JSON routes. Every function here blocks (database, engine commands): the
routes (`app.py`) call them in threads, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplex.errors import InvalidArgument, LoraplexError, NotFound
from loraplex.runtime.serve.console import lineage, views
from loraplex.runtime.serve.console.live import LiveRecorder

MAX_VERSIONS_SHOWN = 200


def adapter_page(reg: Any, identity: Any, key: str, current: int | None = None
                 ) -> dict[str, Any]:
    """Everything the adapter page (or, with `current`, a version page) shows."""
    versions = reg.list_versions(identity, key)
    aliases = reg.aliases(identity, key)
    history = reg.alias_history(identity, key)
    evals = reg.evaluations(identity, key)

    def lookup(ref: str) -> Any:
        try:
            return reg.resolve(identity, ref)
        except (NotFound, InvalidArgument):
            return None

    shown = versions if current is None else [v for v in versions if v.version == current]
    if not shown:
        raise NotFound(f"version {key}:v{current} not found", field="ref")
    graph = lineage.lineage_graph(shown, lookup, current=current)
    rows = [views.version_dict(v, aliases) for v in versions]
    _inherit_formats(rows, versions)
    return {"key": key, "versions": rows[::-1][:MAX_VERSIONS_SHOWN],
            "hidden": max(0, len(rows) - MAX_VERSIONS_SHOWN),
            "aliases": [{"alias": a, "version": n} for a, n in sorted(aliases.items())],
            "rollback": views.previous_targets(history),
            "history": [{"alias": m.alias, "from": m.from_version, "to": m.to_version,
                         "at": views.when(m.at), "by": m.by} for m in history[::-1]],
            "evaluations": [views.evaluation_dict(e) for e in evals[::-1]],
            "card": views.scorecard(versions, evals),
            "drawing": lineage.layout(graph),
            "version_objs": versions}


def serving(engine: Any, live: LiveRecorder | None, identity: Any) -> dict[str, Any]:
    """What the Serving page draws, as `identity` may see it: the recorder's window, where
    adapters sit, and (an admin) the engine's own figures."""
    out: dict[str, Any] = {"live": live is not None}
    if live is not None:
        out.update(live.snapshot(identity.can_access, everything=identity.is_admin))
    resident, note = [], ""
    if engine is not None:
        try:
            resident = [views.resident_dict(r) for r in engine.resident()
                        if identity.can_access(r.ref.split("/", 1)[0])]
        except LoraplexError as e:
            note = e.public_message
        st = _quiet_call(engine.stats) if identity.is_admin else None
        if st is not None:
            out["engine"] = {"slots_used": st.slots_used, "slots_total": st.slots_total,
                             "host_bytes": st.host_bytes, "loading": st.loading,
                             "kv_rows_used": st.kv_rows_used,
                             "kv_rows_total": st.kv_rows_total,
                             "compute_dtype": st.compute_dtype}
    out["resident"], out["resident_note"] = resident, note
    return out


def _quiet_call(fn: Callable[[], Any]) -> Any:
    """`fn()`, or None where this engine cannot answer (Ray replicas: FailedPrecondition)."""
    try:
        return fn()
    except LoraplexError:
        return None


def _inherit_formats(rows: list[dict[str, Any]], versions: list[Any]) -> None:
    """A derived version has no data of its own: show the format of its inputs when they
    are versions of this adapter and agree."""
    by_digest = {v.digest: r for v, r in zip(versions, rows, strict=True)}
    for v, r in zip(versions, rows, strict=True):  # oldest first: inputs come before
        if r["format"] or not (v.lineage or {}).get("inputs"):
            continue
        found = {by_digest[i.get("digest")]["format"] for i in v.lineage["inputs"]
                 if isinstance(i, dict) and i.get("digest") in by_digest}
        found.discard("")
        if len(found) == 1:
            r["format"] = found.pop()
