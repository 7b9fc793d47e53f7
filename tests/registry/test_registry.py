"""The registry's behaviour, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from loraplex.errors import (
    AliasConflict,
    DataCorruption,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from loraplex.registry import UNSET, Identity, Registry

ADMIN = Identity.system()
ACME = Identity("acme")
GLOBEX = Identity("globex")


@pytest.fixture
def push(registry: Registry, make_adapter, micro_base: Path):
    """push(name, seed=0, who=ADMIN) -> AdapterVersion of a fresh valid adapter."""

    def do(name: str = "acme/support", seed: int = 0, who: Identity = ADMIN, **kw):
        return registry.push(who, make_adapter(seed=seed, **kw), name, base=micro_base)

    return do


def test_versions_count_up_and_identical_content_is_not_a_new_version(registry, push) -> None:
    v1, v2 = push(seed=1), push(seed=2)
    assert (v1.version, v2.version, v1.created, v2.created) == (1, 2, True, True)
    again = push(seed=1)
    assert (again.version, again.digest, again.created) == (1, v1.digest, False)
    assert push(seed=3).version == 3
    assert [v.version for v in registry.list_versions(ADMIN, "acme/support")] == [1, 2, 3]


def test_identical_content_for_another_base_is_refused(registry, make_adapter, micro_base,
                                                       base_factory) -> None:
    from loraplex.errors import IncompatibleAdapter

    d = make_adapter(seed=1)
    registry.push(ADMIN, d, "acme/support", base=micro_base)
    other = base_factory("micro", "qwen2")  # same q/v shapes, other weights
    with pytest.raises(IncompatibleAdapter, match="already registered as acme/support:v1"):
        registry.push(ADMIN, d, "acme/support", base=other)
    assert registry.push(ADMIN, d, "acme/for-qwen", base=other).created


def test_every_ref_form_resolves(registry, push) -> None:
    v1, v2 = push(seed=1), push(seed=2)
    registry.set_alias(ADMIN, "acme/support:v1", "prod")
    assert registry.resolve(ADMIN, "acme/support").version == 2
    assert registry.resolve(ADMIN, "acme/support@latest").version == 2
    assert registry.resolve(ADMIN, "acme/support@prod").version == 1
    assert registry.resolve(ADMIN, "acme/support:v1") == v1
    assert registry.resolve(ADMIN, v2.digest).ref == "acme/support:v2"
    with pytest.raises(NotFound, match="version acme/support:v9 not found"):
        registry.resolve(ADMIN, "acme/support:v9")
    with pytest.raises(NotFound, match="alias acme/support@canary not found"):
        registry.resolve(ADMIN, "acme/support@canary")


def test_manifest_fields(registry, push, micro_fp) -> None:
    v = push()
    assert v.rank == 4 and v.alpha == 8.0 and not v.use_rslora
    assert v.target_modules == ("q_proj", "v_proj") and v.dtype == "float32"
    assert v.base.digest == micro_fp.digest and v.base.num_layers == 2
    assert v.size_bytes > 0 and v.created_by == "system" and v.created_at.tzinfo is not None
    assert v.ref == "acme/support:v1" and v.key == "acme/support"
    assert registry.resolve(ADMIN, v.ref) == v


def test_lineage_is_kept(registry, make_adapter, micro_base) -> None:
    lineage = {"dataset_digest": "sha256:" + "1" * 64, "seed": 7, "metrics": {"loss": 0.5}}
    v = registry.push(ADMIN, make_adapter(), "acme/support", base=micro_base, lineage=lineage)
    assert registry.resolve(ADMIN, "acme/support").lineage == lineage
    assert v.lineage == lineage
    assert len({v, registry.resolve(ADMIN, v.ref)}) == 1, "versions are hashable"
    diverged = registry.push(ADMIN, make_adapter(seed=1), "acme/support", base=micro_base,
                             lineage={"metrics": {"loss": float("nan"), "ppl": float("inf")}})
    assert registry.resolve(ADMIN, diverged.ref).lineage == {
        "metrics": {"loss": "nan", "ppl": "inf"}}


def test_list_adapters_pages_through_newest_versions(registry, push) -> None:
    for i, name in enumerate(["acme/a", "acme/b", "acme/c", "globex/a"]):
        push(name, seed=i)
    push("acme/b", seed=9)
    page, token = registry.list_adapters(ADMIN, page_size=2)
    assert [v.ref for v in page] == ["acme/a:v1", "acme/b:v2"]
    page2, token2 = registry.list_adapters(ADMIN, page_size=2, page_token=token)
    assert [v.ref for v in page2] == ["acme/c:v1", "globex/a:v1"] and token2 is None
    assert [v.key for v in registry.list_adapters(ADMIN, tenant="globex")[0]] == ["globex/a"]
    assert [v.key for v in registry.list_adapters(ACME)[0]] == ["acme/a", "acme/b", "acme/c"]
    with pytest.raises(InvalidArgument):
        registry.list_adapters(ADMIN, page_token="garbage!")


def test_alias_compare_and_set_and_audit_log(registry, push) -> None:
    push(seed=1), push(seed=2), push(seed=3)
    registry.set_alias(ACME, "acme/support:v1", "prod", expected=None)
    with pytest.raises(AliasConflict, match="points at v1, expected nothing"):
        registry.set_alias(ACME, "acme/support:v2", "prod", expected=None)
    with pytest.raises(AliasConflict, match="points at v1, expected v3"):
        registry.set_alias(ACME, "acme/support:v2", "prod", expected=3)
    registry.set_alias(ACME, "acme/support:v2", "prod", expected=1)
    registry.set_alias(ADMIN, "acme/support:v3", "prod")  # UNSET: unconditional
    registry.set_alias(ACME, "acme/support:v1", "prod", expected=3)  # rollback = move back
    assert registry.resolve(ACME, "acme/support@prod").version == 1
    moves = registry.alias_history(ACME, "acme/support", "prod")
    assert [(m.from_version, m.to_version, m.by) for m in moves] == [
        (None, 1, "tenant:acme"), (1, 2, "tenant:acme"), (2, 3, "system"),
        (3, 1, "tenant:acme")]
    assert all(m.at.tzinfo is not None for m in moves)
    assert registry.aliases(ACME, "acme/support") == {"prod": 1}
    with pytest.raises(InvalidArgument, match="latest"):
        registry.set_alias(ACME, "acme/support:v1", "latest")
    with pytest.raises(InvalidArgument):
        registry.set_alias(ACME, "acme/support:v1", "prod", expected=0)
    assert UNSET is not None


def test_delete_refused_while_aliased_unless_forced(registry, push) -> None:
    push(seed=1), push(seed=2)
    registry.set_alias(ADMIN, "acme/support:v2", "prod")
    with pytest.raises(FailedPrecondition, match="target of alias prod"):
        registry.delete_version(ADMIN, "acme/support:v2")
    for unpinned in ("acme/support", "acme/support@prod"):
        with pytest.raises(InvalidArgument, match="pinned version"):
            registry.delete_version(ADMIN, unpinned, force=True)
    assert registry.resolve(ADMIN, "acme/support").version == 2
    registry.delete_version(ADMIN, "acme/support:v2", force=True)
    with pytest.raises(NotFound):
        registry.resolve(ADMIN, "acme/support@prod")
    assert registry.resolve(ADMIN, "acme/support").version == 1  # latest follows
    assert push(seed=3).version == 3, "numbers are never reused"
    assert registry.alias_history(ADMIN, "acme/support")[-1].to_version is None
    registry.delete_version(ADMIN, "acme/support:v1")
    kinds = [(c.kind, c.version, c.alias) for c in registry.changes()]
    assert kinds == [("version_created", 1, None), ("version_created", 2, None),
                     ("alias_moved", 2, "prod"), ("alias_moved", None, "prod"),
                     ("version_deleted", 2, None), ("version_created", 3, None),
                     ("version_deleted", 1, None)]
    last = registry.changes()[-2].id
    assert [c.kind for c in registry.changes(after=last)] == ["version_deleted"]


def test_deleted_content_can_come_back_as_a_new_version(registry, push) -> None:
    v1 = push(seed=1)
    registry.delete_version(ADMIN, v1.ref)
    with pytest.raises(NotFound, match="adapter acme/support not found"):
        registry.resolve(ADMIN, "acme/support")
    again = push(seed=1)
    assert (again.version, again.digest, again.created) == (2, v1.digest, True)


def test_tenants_are_invisible_to_each_other(registry, push, tmp_path) -> None:
    acme_v = push("acme/support", seed=1, who=ACME)
    globex_v = push("globex/support", seed=2, who=GLOBEX)
    registry.set_alias(ACME, acme_v.ref, "prod")
    for me, mine, theirs in ((ACME, acme_v, globex_v), (GLOBEX, globex_v, acme_v)):
        assert registry.resolve(me, mine.ref) == mine
        t = theirs.tenant
        calls = {
            "resolve": lambda ref: registry.resolve(me, ref),  # noqa: B023
            "versions": lambda ref: registry.list_versions(me, ref.split(":")[0]),  # noqa: B023
            "history": lambda ref: registry.alias_history(me, ref.split(":")[0]),  # noqa: B023
            "alias": lambda ref: registry.set_alias(me, ref, "x"),  # noqa: B023
            "delete": lambda ref: registry.delete_version(me, ref, force=True),  # noqa: B023
            "pull": lambda ref: registry.pull(me, ref, tmp_path / "p"),  # noqa: B023
        }
        for what, call in calls.items():
            with pytest.raises(NotFound) as real:
                call(f"{t}/support:v1")
            with pytest.raises(NotFound) as missing:
                call(f"{t}/ghost:v1")
            assert real.value.message.replace("support", "ghost") == missing.value.message, what
            assert real.value.field == missing.value.field
        with pytest.raises(NotFound) as by_digest:
            registry.resolve(me, theirs.digest)
        assert by_digest.value.message == f"adapter {theirs.digest} not found"
        assert registry.list_adapters(me, tenant=t) == ([], None)
        assert [v.tenant for v in registry.list_adapters(me)[0]] == [me.tenant]
        with pytest.raises(PermissionDenied):
            push(f"{t}/intruder", seed=5, who=me)
    assert registry.resolve(ADMIN, "acme/support@prod") == acme_v
    assert registry.resolve(ADMIN, "globex/support") == globex_v


def test_tokens_are_stored_only_as_hashes(registry) -> None:
    token = registry.create_token(ADMIN, "acme")
    admin_token = registry.create_token(ADMIN, "ops", admin=True)
    me = registry.authenticate(token)
    assert (me.tenant, me.role) == ("acme", "tenant") and me.subject.startswith("tenant:acme/token:")
    assert registry.authenticate(admin_token).is_admin
    with registry.engine.connect() as conn:
        stored = [tuple(str(x) for x in row) for row in conn.execute(sa.text(
            "SELECT * FROM lpx_tokens"))]
    assert stored and not any(token in col or admin_token in col
                              for row in stored for col in row)
    for bad in ("", "lpx_nope", token + "x", "Bearer " + token):
        with pytest.raises(Unauthenticated):
            registry.authenticate(bad)
    with pytest.raises(PermissionDenied):  # a publish token mints no tokens
        registry.create_token(me, "acme")
    boss = registry.authenticate(registry.create_token(ADMIN, "acme", scope="admin"))
    assert registry.authenticate(registry.create_token(boss, "acme")).tenant == "acme"
    with pytest.raises(PermissionDenied):
        registry.create_token(boss, "globex")
    with pytest.raises(PermissionDenied):
        registry.create_token(boss, "acme", admin=True)
    with pytest.raises(PermissionDenied):
        registry.register_base(me, ".")


def test_load_adapter_gives_module_keyed_tensors(registry, push, micro_fp) -> None:
    v = push()
    loaded = registry.load_adapter(v)
    assert loaded.config["r"] == 4 and loaded.version == v
    pairs = loaded.pairs()
    assert set(pairs) == {m for m in micro_fp.linear_shapes if m.endswith(("q_proj", "v_proj"))}
    a, b = pairs["model.layers.0.self_attn.v_proj"]
    assert tuple(a.shape) == (4, 64) and tuple(b.shape) == (32, 4)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampering_is_detected_by_verify_load_and_pull(registry, push, tmp_path) -> None:
    v = push()
    assert registry.verify() == []
    _flip_a_byte(registry.blobs.path(v.weights_blob))
    problems = registry.verify()
    assert len(problems) == 1 and v.weights_blob in problems[0] and v.ref in problems[0]
    with pytest.raises(DataCorruption):
        registry.load_adapter(v)
    with pytest.raises(DataCorruption):
        registry.pull(ADMIN, v.ref, tmp_path / "out")
    registry.blobs.path(v.config_blob).unlink()
    assert any("missing" in p and v.config_blob in p for p in registry.verify())


def test_gc_frees_blobs_of_deleted_versions_only(registry, push) -> None:
    v1, v2 = push(seed=1), push(seed=2)
    push("acme/copy", seed=2)  # same content under another name shares the blobs
    registry.delete_version(ADMIN, v1.ref)
    registry.delete_version(ADMIN, v2.ref)
    assert registry.gc().removed == [], "young blobs are spared by default"
    report = registry.gc(min_age_s=0)
    assert sorted(report.removed) == sorted({v1.config_blob, v1.weights_blob} - {v2.config_blob})
    assert report.freed_bytes > 0
    assert registry.verify() == []
    registry.load_adapter(registry.resolve(ADMIN, "acme/copy"))


def test_open_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_BLOB_DIR", raising=False)
    with Registry.open(f"sqlite:///{tmp_path / 'a' / 'meta.db'}") as reg:
        assert reg.blobs.root == tmp_path / "a" / "blobs"
    with pytest.raises(InvalidArgument, match="blob_dir"):
        Registry.open("postgresql+psycopg://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("LORAPLEX_BLOB_DIR", str(tmp_path / "env-blobs"))
    with Registry.open(f"sqlite:///{tmp_path / 'b.db'}") as reg:
        assert reg.blobs.root == tmp_path / "env-blobs"
    with Registry.open(tmp_path / "dir") as reg:
        assert (tmp_path / "dir" / "registry.db").is_file()
        assert reg.blobs.root == tmp_path / "dir" / "blobs"
