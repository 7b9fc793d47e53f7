"""AdminService: what is resident on the accelerator. The auth interceptor has already
refused non-admin callers (PERMISSION_DENIED) before any method here runs."""

from __future__ import annotations

import asyncio

from loraplex.errors import InvalidArgument
from loraplex.runtime.serve.interceptors import current_identity
from loraplex.runtime.serve.servicers import convert
from loraplex.runtime.serve.servicers.state import ServingState
from loraplex.v1 import admin_pb2_grpc


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
        engine = self.state.require_engine()
        adapters, stats = await asyncio.to_thread(lambda: (engine.resident(), engine.stats()))
        return convert.resident_pb(adapters, stats)

    async def Stats(self, request, context):
        engine = self.state.require_engine()
        return convert.stats_pb(await asyncio.to_thread(engine.stats))

    async def _adapter_call(self, method: str, ref: str):
        """Resolve the ref once (a registry read) and run the command, both off the event
        loop: the command waits for the engine thread (and a prefetch for the load)."""
        if not ref:
            raise InvalidArgument("`ref` is required", field="ref")
        engine, identity = self.state.require_engine(), current_identity()
        version = await asyncio.to_thread(engine.intake.resolve, identity, ref)
        outcome = await asyncio.to_thread(getattr(engine.admin, method), version)
        return convert.admin_ack_pb(outcome, version)
