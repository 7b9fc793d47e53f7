"""AdminService's token RPCs over a real channel (registry-only server): scopes enforced,
secrets shown once, failures throttled per peer with RetryInfo."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from loraplex.v1 import admin_pb2, admin_pb2_grpc, registry_pb2, registry_pb2_grpc


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("token-rpcs")
    reg = Registry.open(root / "reg")
    settings = load_settings({"base": micro_base, "registry": str(root / "reg"), "port": 0,
                              "host": "127.0.0.1", "metrics_port": 0,
                              "metrics_host": "127.0.0.1"})
    system = Identity.system()
    tokens = {"admin": reg.create_token(system, "ops", admin=True),
              "boss": reg.create_token(system, "acme", scope="admin"),
              "pub": reg.create_token(system, "acme", scope="publish"),
              "infer": reg.create_token(system, "acme", scope="inference")}
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg, \
            grpc.insecure_channel(bg.target) as channel:
        yield {"reg": reg, "tokens": tokens, "admin": admin_pb2_grpc.AdminServiceStub(channel),
               "registry": registry_pb2_grpc.RegistryServiceStub(channel), "target": bg.target}


def _md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def test_token_lifecycle_over_admin_service(world):
    admin, boss = world["admin"], world["tokens"]["boss"]
    made = admin.CreateToken(admin_pb2.CreateTokenRequest(
        tenant="acme", scope=admin_pb2.TOKEN_SCOPE_INFERENCE, ttl_s=3600, label="ci"),
        metadata=_md(boss))  # a tenant-admin token, not the admin role
    assert made.token.startswith("lpx_") and made.info.scope == admin_pb2.TOKEN_SCOPE_INFERENCE
    assert made.info.expires_at.seconds > 0 and made.info.active
    listed = admin.ListTokens(admin_pb2.ListTokensRequest(), metadata=_md(boss))
    assert made.info.id in [t.id for t in listed.tokens]
    assert made.token not in str(listed)
    assert {t.tenant for t in listed.tokens} == {"acme"}
    rotated = admin.RotateToken(admin_pb2.RotateTokenRequest(id=made.info.id),
                                metadata=_md(boss))
    assert rotated.info.id != made.info.id and rotated.info.label == "ci"
    revoked = admin.RevokeToken(admin_pb2.TokenIdRequest(id=rotated.info.id),
                                metadata=_md(boss))
    assert not revoked.active and revoked.revoked_at.seconds > 0
    with pytest.raises(grpc.RpcError) as e:  # the revoked token is refused at once
        world["registry"].ListAdapters(registry_pb2.ListAdaptersRequest(),
                                       metadata=_md(rotated.token))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    history = admin.TokenHistory(admin_pb2.TokenHistoryRequest(), metadata=_md(boss))
    assert [ev.action for ev in history.events][-4:] == ["created", "created", "rotated",
                                                         "revoked"]


def test_the_client_speaks_the_token_rpcs(world):
    from loraplex.client import Client

    with Client(world["target"], token=world["tokens"]["admin"], timeout=20) as ops:
        made = ops.create_token("globex", "publish", ttl_s=60, label="ci")
        assert made.info.tenant == "globex" and made.info.scope == admin_pb2.TOKEN_SCOPE_PUBLISH
        assert made.info.id in [t.id for t in ops.list_tokens("globex")]
        assert not ops.revoke_token(made.info.id).active
        assert [e.action for e in ops.token_history("globex")] == ["created", "revoked"]


@pytest.mark.parametrize("who", ["pub", "infer"])
def test_lower_scopes_cannot_mint_or_list_tokens(world, who):
    token = world["tokens"][who]
    for call, req in ((world["admin"].CreateToken, admin_pb2.CreateTokenRequest(tenant="acme")),
                      (world["admin"].ListTokens, admin_pb2.ListTokensRequest())):
        with pytest.raises(grpc.RpcError) as e:
            call(req, metadata=_md(token))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_tenant_admin_is_still_not_the_admin_role(world):
    with pytest.raises(grpc.RpcError) as e:
        world["admin"].Stats(admin_pb2.StatsRequest(), metadata=_md(world["tokens"]["boss"]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        world["admin"].CreateToken(admin_pb2.CreateTokenRequest(tenant="globex"),
                                   metadata=_md(world["tokens"]["boss"]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_failed_authentications_are_throttled_with_retry_info(world):
    free = world["reg"].settings.auth_failures_free
    codes = []
    for i in range(free + 2):
        with pytest.raises(grpc.RpcError) as e:
            world["registry"].ListAdapters(registry_pb2.ListAdaptersRequest(),
                                           metadata=_md(f"lpx_{i:043d}"))
        codes.append(e.value.code())
    assert codes[:free] == [grpc.StatusCode.UNAUTHENTICATED] * free
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(e.value)
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry
    world["reg"].tokens._peers.clear()  # leave the other tests' peer (127.0.0.1) clean


def test_purge_tokens_over_admin_service(world):
    from loraplex.client import Client

    with Client(world["target"], token=world["tokens"]["admin"], timeout=20) as ops:
        made = ops.create_token("initech", "publish")
        ops.revoke_token(made.info.id)
        assert ops.purge_tokens("initech") == []  # revoked just now: within the retention
        assert ops.purge_tokens("initech", older_than_s=0) == [made.info.id]
        assert made.info.id not in [t.id for t in ops.list_tokens("initech",
                                                                  include_inactive=True)]
        assert [e.action for e in ops.token_history("initech")] == ["created", "revoked",
                                                                    "purged"]
    with pytest.raises(grpc.RpcError) as e:  # a publish token may not purge
        world["admin"].PurgeTokens(admin_pb2.PurgeTokensRequest(older_than_s=0),
                                   metadata=_md(world["tokens"]["pub"]))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
