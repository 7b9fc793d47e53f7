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
