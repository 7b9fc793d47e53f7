"""Evaluation records and name search, on SQLite and PostgreSQL: scores kept per version
(append-only, audited, scoped), refused when malformed, invisible across tenants; search
finds adapters by part of their name, a page at a time, within the caller's tenant."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex.errors import InvalidArgument, NotFound, PermissionDenied
from loraplex.registry import Identity, Registry

ADMIN = Identity.system()
ACME = Identity("acme", subject="ci@acme")
GLOBEX = Identity("globex")


def test_scores_are_kept_per_version_oldest_first_with_who_and_when(
        registry: Registry, make_adapter, micro_base: Path) -> None:
    for seed in (1, 2):
        registry.push(ACME, make_adapter(seed=seed), "acme/support", base=micro_base)
    registry.record_evaluation(ACME, "acme/support:v1", "eval", {"loss": 0.5, "exact_match": 0.7},
                               data_digest="sha256:" + "a" * 64, detail={"n": 20})
    registry.record_evaluation(ACME, "acme/support@latest", "eval", {"loss": 0.4,
                                                                     "exact_match": 0.8})
    registry.record_evaluation(ACME, "acme/support:v2", "gate", {"exact_match": 0.8},
                               detail={"passed": True, "reason": "meets exact_match>=0.7"})
    got = registry.evaluations(ACME, "acme/support")
    assert [(e.version, e.kind) for e in got] == [(1, "eval"), (2, "eval"), (2, "gate")]
    assert got[0].metrics == {"loss": 0.5, "exact_match": 0.7} and got[0].detail == {"n": 20}
    assert got[0].data_digest == "sha256:" + "a" * 64 and got[0].created_by == "ci@acme"
    assert got[2].detail["passed"] is True
    assert [e.kind for e in registry.evaluations(ADMIN, "acme/support", version=2)] == [
        "eval", "gate"]


def test_another_tenant_neither_reads_nor_writes_them(
        registry: Registry, make_adapter, micro_base: Path) -> None:
    registry.push(ACME, make_adapter(seed=3), "acme/support", base=micro_base)
    registry.record_evaluation(ACME, "acme/support:v1", "eval", {"loss": 0.5})
    with pytest.raises(NotFound) as foreign:
        registry.evaluations(GLOBEX, "acme/support")
    with pytest.raises(NotFound) as missing:
        registry.evaluations(GLOBEX, "globex/nothing")
    assert str(foreign.value).replace("acme/support", "X") == \
        str(missing.value).replace("globex/nothing", "X")
    with pytest.raises(NotFound):
        registry.record_evaluation(GLOBEX, "acme/support:v1", "eval", {"loss": 0.0})
    reader = Identity("acme", scope="inference")
    with pytest.raises(PermissionDenied):
        registry.record_evaluation(reader, "acme/support:v1", "eval", {"loss": 0.0})
    assert len(registry.evaluations(reader, "acme/support")) == 1


@pytest.mark.parametrize(("metrics", "detail", "field"), [
    ({}, None, "metrics"),
    ({"loss": float("nan")}, None, "metrics.loss"),
    ({"loss": True}, None, "metrics.loss"),
    ({f"m{i}": 1.0 for i in range(33)}, None, "metrics"),
    ({"loss": 1.0}, {"blob": "x" * 9000}, "detail"),
    ({"loss": 1.0}, {"bad": float("inf")}, "detail"),
])
def test_malformed_records_are_refused_naming_the_field(
        registry: Registry, make_adapter, micro_base: Path, metrics, detail, field) -> None:
    registry.push(ACME, make_adapter(seed=4), "acme/support", base=micro_base)
    with pytest.raises(InvalidArgument) as e:
        registry.record_evaluation(ACME, "acme/support:v1", "eval", metrics, detail=detail)
    assert e.value.field == field
    assert registry.evaluations(ACME, "acme/support") == []


def test_search_finds_names_containing_the_text_a_page_at_a_time(
        registry: Registry, make_adapter, micro_base: Path) -> None:
    adapter = make_adapter(seed=5)
    for name in ("acme/support", "acme/support-fr", "acme/sales", "acme/a_b",
                 "globex/support"):
        registry.push(ADMIN, adapter, name, base=micro_base)
    page, token = registry.search_adapters(ACME, "support", page_size=1)
    assert [v.key for v in page] == ["acme/support"] and token
    page, token = registry.search_adapters(ACME, "support", page_size=1, page_token=token)
    assert [v.key for v in page] == ["acme/support-fr"] and token is None
    assert [v.key for v in registry.search_adapters(ADMIN, "support")[0]] == [
        "acme/support", "acme/support-fr", "globex/support"]
    assert [v.key for v in registry.search_adapters(ADMIN, "globex/supp")[0]] == [
        "globex/support"]
    assert registry.search_adapters(ACME, "globex/support") == ([], None)
    assert [v.key for v in registry.search_adapters(ACME, "_")[0]] == ["acme/a_b"]  # literal
    assert len(registry.search_adapters(ACME, "")[0]) == 4
