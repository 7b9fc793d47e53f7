"""Merge and compress ask for bounded work, checked before anything is loaded."""

from __future__ import annotations

import pytest

from loraplex.errors import InvalidArgument
from loraplex.limits import MAX_MERGE_INPUTS, MAX_RANK
from loraplex.registry import Identity
from loraplex.registry.derive import merge_versions

ADMIN = Identity.system()


@pytest.fixture
def two(sqlite_reg, make_adapter):
    a = sqlite_reg.push(ADMIN, make_adapter(seed=1), "acme/a")
    b = sqlite_reg.push(ADMIN, make_adapter(seed=2), "acme/b")
    return a, b


@pytest.fixture
def no_loads(sqlite_reg, monkeypatch):
    """Fail the test if a merge loads any adapter before refusing."""
    def refuse(version):
        raise AssertionError(f"{version.ref} was loaded before the bounds were checked")
    monkeypatch.setattr(sqlite_reg, "load_adapter", refuse)


def test_too_many_inputs_are_refused_before_any_load(sqlite_reg, two, no_loads):
    refs = [two[0].ref] * (MAX_MERGE_INPUTS + 1)
    with pytest.raises(InvalidArgument, match=f"1 to {MAX_MERGE_INPUTS}") as e:
        merge_versions(sqlite_reg, ADMIN, refs, name="acme/m")
    assert e.value.field == "refs"


def test_a_repeated_input_is_refused_before_any_load(sqlite_reg, two, no_loads):
    a, _ = two
    with pytest.raises(InvalidArgument, match="same version") as e:
        merge_versions(sqlite_reg, ADMIN, [a.ref, "acme/a@latest"], name="acme/m")
    assert e.value.field == "refs"


@pytest.mark.parametrize("svd_rank", [0, -3, MAX_RANK + 1, 10**9])
def test_svd_rank_is_bounded_by_the_rank_limit(sqlite_reg, two, no_loads, svd_rank):
    with pytest.raises(InvalidArgument) as e:
        merge_versions(sqlite_reg, ADMIN, [two[0].ref, two[1].ref], name="acme/m",
                       method="svd", svd_rank=svd_rank)
    assert e.value.field == "svd_rank"


def test_cat_beyond_the_rank_limit_is_refused(sqlite_reg, make_adapter):
    refs = [sqlite_reg.push(ADMIN, make_adapter(seed=i, r=MAX_RANK // 2), f"acme/c{i}").ref
            for i in range(3)]
    with pytest.raises(InvalidArgument, match=f"rank {3 * (MAX_RANK // 2)}"):
        merge_versions(sqlite_reg, ADMIN, refs, name="acme/m", method="cat")


def test_bounded_merges_still_work(sqlite_reg, two):
    v = merge_versions(sqlite_reg, ADMIN, [two[0].ref, two[1].ref], name="acme/m",
                       method="svd", svd_rank=2)
    assert v.rank == 2
