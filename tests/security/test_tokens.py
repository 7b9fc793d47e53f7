"""Tokens with a lifecycle: expiry, revoke, list, rotate, scopes, audit, failure throttling,
on SQLite and PostgreSQL, and through the CLI."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from loraplex.errors import AuthThrottled, PermissionDenied, Unauthenticated
from loraplex.registry import Identity, db
from loraplex.registry.cli import app

ADMIN = Identity.system()


def test_scopes_limit_what_a_token_may_do(registry, make_adapter):
    v = registry.push(ADMIN, make_adapter(), "acme/a")
    infer = registry.authenticate(registry.create_token(ADMIN, "acme", scope="inference"))
    pub = registry.authenticate(registry.create_token(ADMIN, "acme", scope="publish"))
    boss = registry.authenticate(registry.create_token(ADMIN, "acme", scope="admin"))
    assert registry.resolve(infer, "acme/a").digest == v.digest  # inference may read
    for denied in (lambda: registry.push(infer, make_adapter(seed=2), "acme/a"),
                   lambda: registry.set_alias(infer, v.ref, "prod"),
                   lambda: registry.delete_version(infer, v.ref),
                   lambda: registry.create_token(infer, "acme", scope="inference"),
                   lambda: registry.create_token(pub, "acme", scope="inference"),
                   lambda: registry.list_tokens(pub)):
        with pytest.raises(PermissionDenied):
            denied()
    registry.set_alias(pub, v.ref, "prod")
    assert registry.push(pub, make_adapter(seed=2), "acme/a").version == 2
    # a tenant-admin token manages its own tenant's tokens, and only those
    assert registry.authenticate(registry.create_token(boss, "acme", scope="inference")).scope \
        == "inference"
    with pytest.raises(PermissionDenied):
        registry.create_token(boss, "globex")
    with pytest.raises(PermissionDenied):
        registry.create_token(boss, "acme", admin=True)
    assert registry.authenticate(registry.create_token(ADMIN, "ops", admin=True)).is_admin


def test_list_shows_times_and_never_a_secret(registry):
    secret = registry.create_token(ADMIN, "acme", label="ci")
    registry.authenticate(secret)
    [info] = registry.list_tokens(ADMIN, "acme")
    assert (info.tenant, info.scope, info.label) == ("acme", "publish", "ci")
    assert info.created_at <= datetime.now(UTC) and info.last_used_at is not None
    shown = json.dumps(info.as_dict())
    assert secret not in shown and secret[4:20] not in shown
    assert db.tokens.c.token_hash.name not in info.as_dict()


def test_revoke_takes_effect_at_once_and_is_audited(registry):
    secret = registry.create_token(ADMIN, "acme")
    me = registry.authenticate(secret)  # now cached
    [info] = registry.list_tokens(ADMIN, "acme")
    registry.revoke_token(ADMIN, info.id)
    with pytest.raises(Unauthenticated):
        registry.authenticate(secret)
    assert registry.list_tokens(ADMIN, "acme") == []
    [gone] = registry.list_tokens(ADMIN, "acme", include_inactive=True)
    assert gone.revoked_by == ADMIN.who
    assert [e.action for e in registry.token_history(ADMIN, "acme")] == ["created", "revoked"]
    assert me.subject.endswith(info.id)


def test_a_revocation_by_another_process_lands_within_the_cache_time(db_location):
    from loraplex.registry import Registry, RegistrySettings

    location, kw = db_location
    settings = kw.get("settings") or RegistrySettings()
    fast = settings.model_copy(update={"token_cache_s": 0.2})
    with Registry.open(location, **kw | {"settings": fast}) as server, \
            Registry.open(location, **kw) as operator:
        secret = operator.create_token(ADMIN, "acme")
        server.authenticate(secret)
        operator.revoke_token(ADMIN, operator.list_tokens(ADMIN, "acme")[0].id)
        time.sleep(0.3)
        with pytest.raises(Unauthenticated):
            server.authenticate(secret)


def test_expired_tokens_are_refused(registry):
    secret = registry.create_token(ADMIN, "acme", ttl_s=3600)
    assert registry.authenticate(secret).tenant == "acme"
    with registry.engine.begin() as conn:  # an hour passes
        conn.execute(sa.update(db.tokens).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    registry.tokens._good.clear()  # as a fresh process would
    with pytest.raises(Unauthenticated):
        registry.authenticate(secret)
    assert registry.list_tokens(ADMIN, "acme") == []


def test_rotation_replaces_a_token_with_an_optional_grace(registry):
    old = registry.create_token(ADMIN, "acme", scope="inference", label="svc")
    old_id = registry.list_tokens(ADMIN, "acme")[0].id
    new, info = registry.rotate_token(ADMIN, old_id, grace_s=3600)
    assert (info.scope, info.label) == ("inference", "svc") and info.id != old_id
    assert registry.authenticate(new).scope == "inference"
    assert registry.authenticate(old).tenant == "acme"  # within its grace
    newer, _ = registry.rotate_token(ADMIN, info.id)  # no grace: the old one stops now
    with pytest.raises(Unauthenticated):
        registry.authenticate(new)
    assert registry.authenticate(newer).tenant == "acme"
    actions = [e.action for e in registry.token_history(ADMIN, "acme")]
    assert actions.count("rotated") == 2 and actions.count("created") == 3


def test_repeated_failures_cost_no_database_query_and_back_off(registry):
    tokens = registry.tokens
    bad = "lpx_" + "x" * 43
    with pytest.raises(Unauthenticated):
        registry.authenticate(bad)
    before = tokens.db_lookups
    for _ in range(100):  # the same bad token: the negative cache answers
        with pytest.raises(Unauthenticated):
            registry.authenticate(bad)
    assert tokens.db_lookups == before
    good = registry.create_token(ADMIN, "acme")
    free = registry.settings.auth_failures_free
    for i in range(free):  # distinct bad tokens from one peer: each looked up once ...
        with pytest.raises(Unauthenticated):
            registry.authenticate(f"lpx_{i:043d}", peer="ipv4:10.9.9.9")
    looked = tokens.db_lookups
    with pytest.raises(AuthThrottled) as e:  # ... then refused without a lookup
        for i in range(free, free + 3):
            try:
                registry.authenticate(f"lpx_{i:043d}", peer="ipv4:10.9.9.9")
            except Unauthenticated:
                continue
    assert e.value.code == "RESOURCE_EXHAUSTED" and e.value.retry_after_s > 0
    assert tokens.db_lookups <= looked + 1
    with pytest.raises(AuthThrottled):  # even a good token waits out the backoff
        registry.authenticate(good, peer="ipv4:10.9.9.9")
    assert registry.authenticate(good, peer="ipv4:10.1.1.1").tenant == "acme"


def test_cli_token_lifecycle(tmp_path):
    reg = str(tmp_path / "reg")
    run = CliRunner().invoke
    made = run(app, ["token", "create", "acme", "--scope", "inference", "--ttl", "30d",
                     "--label", "ci", "--registry", reg, "--json"])
    assert made.exit_code == 0, made.output
    created = json.loads(made.output)
    assert created["scope"] == "inference" and created["token"].startswith("lpx_")
    listed = json.loads(run(app, ["token", "list", "acme", "--registry", reg, "--json"]).output)
    assert [t["id"] for t in listed] == [created["id"]]
    assert "token" not in listed[0] and created["token"] not in json.dumps(listed)
    # an inference token cannot mint tokens
    refused = run(app, ["token", "create", "acme", "--registry", reg, "--token",
                        created["token"]])
    assert refused.exit_code == 1 and "PERMISSION_DENIED" in refused.output
    rotated = json.loads(run(app, ["token", "rotate", created["id"], "--registry", reg,
                                   "--json"]).output)
    assert rotated["replaces"] == created["id"]
    out = run(app, ["token", "revoke", rotated["id"], "--registry", reg])
    assert out.exit_code == 0 and rotated["id"] in out.output
    hist = json.loads(run(app, ["token", "history", "acme", "--registry", reg, "--json"]).output)
    assert [h["action"] for h in hist] == ["created", "created", "rotated", "revoked"]


def test_a_tenant_admin_cannot_see_or_revoke_an_admin_token_of_its_tenant(registry):
    registry.create_token(ADMIN, "ops", admin=True)
    boss = registry.authenticate(registry.create_token(ADMIN, "ops", scope="admin"))
    [admin_info] = [t for t in registry.list_tokens(ADMIN, "ops") if t.role == "admin"]
    assert [t.role for t in registry.list_tokens(boss, "ops")] == ["tenant"]
    from loraplex.errors import NotFound

    with pytest.raises(NotFound):
        registry.revoke_token(boss, admin_info.id)
    with pytest.raises(NotFound):
        registry.rotate_token(boss, admin_info.id)


def _age(registry, token_id: str, column: str, days: float) -> None:
    """Move a token's revocation or expiry `days` into the past (time passing)."""
    with registry.engine.begin() as conn:
        conn.execute(sa.update(db.tokens).where(db.tokens.c.id == token_id).values(
            {column: datetime.now(UTC) - timedelta(days=days)}))


def _ids(registry, tenant: str) -> set[str]:
    return {t.id for t in registry.list_tokens(ADMIN, tenant, include_inactive=True)}


def test_inactive_tokens_are_purged_after_the_retention_and_audited(registry):
    keep = registry.issue_token(ADMIN, "acme")[1]
    old_revoked = registry.issue_token(ADMIN, "acme")[1]
    old_expired = registry.issue_token(ADMIN, "acme", ttl_s=60)[1]
    new_revoked = registry.issue_token(ADMIN, "acme")[1]
    registry.revoke_token(ADMIN, old_revoked.id)
    registry.revoke_token(ADMIN, new_revoked.id)
    _age(registry, old_revoked.id, "revoked_at", 31)
    _age(registry, old_expired.id, "expires_at", 31)
    _age(registry, new_revoked.id, "revoked_at", 29)
    assert _ids(registry, "acme") == {keep.id, old_revoked.id, old_expired.id, new_revoked.id}
    registry.create_token(ADMIN, "globex")  # any creation purges past the 30-day retention
    assert _ids(registry, "acme") == {keep.id, new_revoked.id}
    purged = [e for e in registry.token_history(ADMIN, "acme") if e.action == "purged"]
    assert {e.token_id for e in purged} == {old_revoked.id, old_expired.id}
    assert all(e.by == "system:token-retention" for e in purged)
    # on demand, with a shorter age: the recently revoked one goes, the active one stays
    assert registry.purge_tokens(ADMIN, "acme", older_than_s=0) == [new_revoked.id]
    assert _ids(registry, "acme") == {keep.id}
    assert registry.list_tokens(ADMIN, "acme")[0].id == keep.id


def test_purge_is_scoped_like_the_other_token_verbs(registry):
    boss = registry.authenticate(registry.create_token(ADMIN, "acme", scope="admin"))
    pub = registry.authenticate(registry.create_token(ADMIN, "acme", scope="publish"))
    theirs = registry.issue_token(ADMIN, "globex")[1]
    admin_tok = registry.issue_token(ADMIN, "acme", admin=True)[1]
    mine = registry.issue_token(ADMIN, "acme")[1]
    for info in (theirs, admin_tok, mine):
        registry.revoke_token(ADMIN, info.id)
    with pytest.raises(PermissionDenied):
        registry.purge_tokens(pub, older_than_s=0)
    with pytest.raises(PermissionDenied):
        registry.purge_tokens(boss, "globex", older_than_s=0)
    # a tenant-admin purges its own tenant's tenant tokens, never an admin token
    assert registry.purge_tokens(boss, older_than_s=0) == [mine.id]
    assert admin_tok.id in _ids(registry, "acme") and theirs.id in _ids(registry, "globex")
    assert sorted(registry.purge_tokens(ADMIN, older_than_s=0)) == sorted([theirs.id,
                                                                           admin_tok.id])


def test_cli_token_purge(tmp_path):
    reg = str(tmp_path / "reg")
    run = CliRunner().invoke
    made = json.loads(run(app, ["token", "create", "acme", "--registry", reg,
                                "--json"]).output)
    run(app, ["token", "revoke", made["id"], "--registry", reg])
    kept = run(app, ["token", "purge", "acme", "--registry", reg, "--json"])
    assert kept.exit_code == 0 and json.loads(kept.output) == {"purged": []}  # within retention
    out = run(app, ["token", "purge", "acme", "--older-than", "0", "--registry", reg])
    assert out.exit_code == 0 and made["id"] in out.output
    hist = json.loads(run(app, ["token", "history", "acme", "--registry", reg, "--json"]).output)
    assert [h["action"] for h in hist] == ["created", "revoked", "purged"]


def test_the_event_loop_answer_needs_no_database_and_a_success_does_not_reset_backoff(
        registry):
    tokens = registry.tokens
    good = registry.create_token(ADMIN, "acme")
    assert registry.authenticate_cached(good, peer="ipv4:10.7.7.7") is None  # not yet seen
    registry.authenticate(good, peer="ipv4:10.7.7.7")
    before = tokens.db_lookups
    assert registry.authenticate_cached(good, peer="ipv4:10.7.7.7").tenant == "acme"
    assert registry.authenticate_cached("lpx_" + "u" * 43) is None  # unknown: a lookup
    free = registry.settings.auth_failures_free
    for i in range(free + 1):  # an attacker holding `good` interleaves it with guesses ...
        with pytest.raises(Unauthenticated):
            registry.authenticate(f"lpx_{i:043d}", peer="ipv4:10.7.7.7")
        assert registry.authenticate(good, peer="ipv4:10.7.7.7").tenant == "acme"
    with pytest.raises(AuthThrottled):  # ... and is backed off all the same
        registry.authenticate_cached(f"lpx_{free + 1:043d}", peer="ipv4:10.7.7.7")
    with pytest.raises(Unauthenticated):  # a known bad token is refused without a lookup
        registry.authenticate_cached("lpx_" + "0" * 43, peer="ipv4:10.8.8.8")
    assert tokens.db_lookups == before + free + 1


def test_a_good_token_keeps_working_from_a_backing_off_address_past_the_cache_time(
        open_registry):
    registry = open_registry(token_cache_s=0.1)
    good = registry.create_token(ADMIN, "acme")
    registry.authenticate(good, peer="ipv4:10.6.6.6")
    for i in range(registry.settings.auth_failures_free + 1):  # an attacker, same address
        with pytest.raises(Unauthenticated):
            registry.authenticate(f"lpx_{i:043d}", peer="ipv4:10.6.6.6")
    time.sleep(0.2)  # the cached answer is due for a recheck: asked again, not throttled
    assert registry.authenticate(good, peer="ipv4:10.6.6.6").tenant == "acme"
    registry.revoke_token(ADMIN, registry.list_tokens(ADMIN, "acme")[0].id)
    with pytest.raises(Unauthenticated):  # and a revoked one stops, from any address
        registry.authenticate(good, peer="ipv4:10.5.5.5")
