"""Evaluation records: the scores a version got, kept beside it so teams compare v3 with v4
before they move an alias.

    reg.record_evaluation(me, "acme/support:v4", "eval", {"loss": 0.41, "exact_match": 0.9},
                          data_digest="sha256:…", detail={"data": "test.jsonl", "n": 50})
    reg.evaluations(me, "acme/support")   # every record of every version, oldest first

`loraplex eval` records its scores here when it scored a registry version, and the gate of
`loraplex registry compress|merge --gate` records its verdict. A record is append-only and
audited like an alias move: who recorded it and when; a newer record of the same name does
not replace an older one (both are shown). Recording needs scope `publish`, reading
`inference`; a tenant sees only its own adapters' records, and asking about another
tenant's adapter raises the same `NotFound` a missing one does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from loraplex.errors import InvalidArgument, quote
from loraplex.registry import db
from loraplex.registry.db import evaluations
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.refs import check_name, parse_key
from loraplex.registry.rows import Store, adapter_id, now, utc, visible_adapter

MAX_METRICS = 32
MAX_DETAIL_BYTES = 8192
MAX_DIGEST_CHARS = 128


@dataclass(frozen=True)
class Evaluation:
    """One recorded score sheet of one version."""

    tenant: str
    name: str  # the adapter's name
    version: int
    kind: str  # what was measured: "eval" (`loraplex eval`), "gate" (a derivation's gate)
    metrics: dict[str, float]
    data_digest: str | None
    detail: dict[str, Any]
    created_at: datetime
    created_by: str

    @property
    def ref(self) -> str:
        return f"{self.tenant}/{self.name}:v{self.version}"


def check(kind: str, metrics: Any, data_digest: Any, detail: Any) -> tuple[dict, dict]:
    """The metrics and detail as stored, or InvalidArgument naming the field at fault:
    every part is bounded before anything is written."""
    check_name(kind, "evaluation name", field="name")
    if not isinstance(metrics, dict) or not metrics or len(metrics) > MAX_METRICS:
        raise InvalidArgument(f"metrics must map 1 to {MAX_METRICS} names to numbers",
                              field="metrics")
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise InvalidArgument(f"metric name {quote(key)} must be 1-64 characters",
                                  field="metrics")
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value):
            raise InvalidArgument(f"metric {quote(key)} must be a finite number",
                                  field=f"metrics.{key}")
        clean[key] = float(value)
    if data_digest is not None and (not isinstance(data_digest, str)
                                    or not 0 < len(data_digest) <= MAX_DIGEST_CHARS):
        raise InvalidArgument(f"data_digest must be at most {MAX_DIGEST_CHARS} characters",
                              field="data_digest")
    detail = {} if detail is None else detail
    try:
        size = len(json.dumps(detail, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"detail must be plain JSON: {e}", field="detail") from None
    if not isinstance(detail, dict) or size > MAX_DETAIL_BYTES:
        raise InvalidArgument(f"detail must be a JSON object of at most {MAX_DETAIL_BYTES} "
                              "bytes", field="detail")
    return clean, detail


def record(store: Store, identity: Identity, target: AdapterVersion, kind: str,
           metrics: dict[str, float], data_digest: str | None,
           detail: dict[str, Any]) -> Evaluation:
    """Append one record for `target` (resolved, and checked by `check`, by the caller)."""
    at = now()
    with db.write_tx(store.engine) as conn:
        aid = adapter_id(conn, target.tenant, target.name)
        conn.execute(sa.insert(evaluations).values(
            adapter_id=aid, version=target.version, name=kind, data_digest=data_digest,
            metrics=metrics, detail=detail, created_at=at, created_by=identity.who))
    return Evaluation(target.tenant, target.name, target.version, kind, metrics, data_digest,
                      detail, at, identity.who)


def of_adapter(store: Store, identity: Identity, key: str,
               version: int | None = None) -> list[Evaluation]:
    """Every record of `tenant/name` (or of one of its versions), oldest first: one seek on
    (adapter_id, version, id)."""
    tenant, name = parse_key(key, field="ref")
    with db.read_tx(store.engine) as conn:
        aid = visible_adapter(conn, identity, tenant, name)
        q = sa.select(evaluations).where(evaluations.c.adapter_id == aid)
        if version is not None:
            q = q.where(evaluations.c.version == version)
        rows = conn.execute(q.order_by(evaluations.c.version, evaluations.c.id)).all()
    return [Evaluation(tenant, name, r.version, r.name, dict(r.metrics), r.data_digest,
                       dict(r.detail or {}), utc(r.created_at), r.created_by) for r in rows]
