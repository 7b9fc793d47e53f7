"""AdminService: what is resident on the accelerator, and API tokens.

The auth interceptor has already refused non-admin callers (PERMISSION_DENIED) of the
residency methods before they run; the token methods are authorized by the registry
(scope `admin`: an admin, or a tenant-admin token for its own tenant), which also writes
their audit rows."""

from __future__ import annotations

import asyncio

from loraplex.errors import InvalidArgument
from loraplex.runtime.serve.interceptors import current_identity
from loraplex.runtime.serve.servicers import convert
from loraplex.runtime.serve.servicers.state import ServingState
from loraplex.v1 import admin_pb2, admin_pb2_grpc

DEFAULT_RESIDENT_LIMIT = 100
MAX_RESIDENT_LIMIT = 1000


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def Prefetch(self, request, context):
        return await self._adapter_call("prefetch", request.ref)

    async def Unload(self, request, context):
        return await self._adapter_call("unload", request.ref)

    async def Pin(self, request, context):
        return await self._adapter_call("pin", request.ref)

    async def Unpin(self, request, context):
        return await self._adapter_call("unpin", request.ref)

    async def Resident(self, request, context):
        """At most `limit` adapters (slots first): a server holding a thousand adapters
        answers with a bounded message, and says when it left some out."""
        limit = request.limit or DEFAULT_RESIDENT_LIMIT
        if limit > MAX_RESIDENT_LIMIT:
            raise InvalidArgument(f"limit must be <= {MAX_RESIDENT_LIMIT}", field="limit")
        engine = self.state.require_engine()
        adapters, stats = await asyncio.to_thread(
            lambda: (engine.resident(limit + 1), engine.stats()))
        return convert.resident_pb(adapters[:limit], stats, truncated=len(adapters) > limit)

    async def Stats(self, request, context):
        engine = self.state.require_engine()
        return convert.stats_pb(await asyncio.to_thread(engine.stats))

    # -- tokens ----------------------------------------------------------------------------
    async def CreateToken(self, request, context):
        scope = convert.TOKEN_SCOPES.get(request.scope)
        if request.scope not in convert.TOKEN_SCOPES:
            raise InvalidArgument(f"unknown scope {request.scope}", field="scope")
        if not request.tenant:
            raise InvalidArgument("`tenant` is required", field="tenant")
        secret, info = await asyncio.to_thread(
            self.state.registry.issue_token, current_identity(), request.tenant,
            scope="admin" if request.admin else scope, admin=request.admin,
            ttl_s=request.ttl_s or None, label=request.label)
        return admin_pb2.TokenSecret(token=secret, info=convert.token_info_pb(info))

    async def ListTokens(self, request, context):
        infos = await asyncio.to_thread(self.state.registry.list_tokens, current_identity(),
                                        request.tenant or None,
                                        include_inactive=request.include_inactive)
        return admin_pb2.ListTokensResponse(tokens=[convert.token_info_pb(i) for i in infos])

    async def RevokeToken(self, request, context):
        info = await asyncio.to_thread(self.state.registry.revoke_token, current_identity(),
                                       _token_id(request.id))
        return convert.token_info_pb(info)

    async def RotateToken(self, request, context):
        secret, info = await asyncio.to_thread(
            self.state.registry.rotate_token, current_identity(), _token_id(request.id),
            grace_s=request.grace_s)
        return admin_pb2.TokenSecret(token=secret, info=convert.token_info_pb(info))

    async def TokenHistory(self, request, context):
        events = await asyncio.to_thread(self.state.registry.token_history,
                                         current_identity(), request.tenant or None)
        return admin_pb2.TokenHistoryResponse(events=[convert.token_event_pb(e)
                                                      for e in events])

    async def PurgeTokens(self, request, context):
        ids = await asyncio.to_thread(
            self.state.registry.purge_tokens, current_identity(), request.tenant or None,
            older_than_s=request.older_than_s if request.HasField("older_than_s") else None)
        return admin_pb2.PurgeTokensResponse(ids=ids)

    async def _adapter_call(self, method: str, ref: str):
        """Resolve the ref once (a registry read) and run the command, both off the event
        loop: the command waits for the engine thread (and a prefetch for the load)."""
        if not ref:
            raise InvalidArgument("`ref` is required", field="ref")
        engine, identity = self.state.require_engine(), current_identity()
        version = await asyncio.to_thread(engine.intake.resolve, identity, ref)
        outcome = await asyncio.to_thread(getattr(engine.admin, method), version)
        return convert.admin_ack_pb(outcome, version)


def _token_id(value: str) -> str:
    if not value:
        raise InvalidArgument("`id` is required (tok_…, from ListTokens)", field="id")
    return value
