"""InferenceService: Generate, GenerateStream, BatchGenerate, ListModels.

A generation RPC owns one engine request. Whatever ends the RPC early — the client cancels,
the server shuts down — the `finally` of `_owned` cancels the engine request, so its
sequence slot and KV rows are freed at once instead of decoding for no one. The client's
deadline is handed to the engine (`GenerationRequest.deadline`): a queued request past it
never starts, and a call its deadline ended is left to the engine, which ends it by that
same deadline within a step, so it is counted as `deadline`, not `cancelled`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import contextmanager

from loraplex.errors import Cancelled, DeadlineExceeded, InvalidArgument, LoraplexError
from loraplex.runtime import grpc_errors
from loraplex.runtime.interceptors import current_identity, current_request_id, ended_by_client
from loraplex.runtime.servicers import convert
from loraplex.runtime.servicers.state import ServingState
from loraplex.v1 import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def Generate(self, request, context):
        engine = self.state.require_engine()
        gen, client_id = self._request(request, context)
        with self._owned(engine, gen.request_id, context) as owned:
            result = await engine.submit(gen).result()
            owned.done = True
        _raise_if_cut_short(result)
        return convert.response_pb(result, client_id)

    async def GenerateStream(self, request, context) -> AsyncIterator:
        engine = self.state.require_engine()
        gen, client_id = self._request(request, context)
        with self._owned(engine, gen.request_id, context) as owned:
            stream = engine.submit(gen)
            async for chunk in stream:
                yield convert.chunk_pb(chunk, client_id)
            result = await stream.result()
            owned.done = True
        _raise_if_cut_short(result)
        yield convert.final_chunk_pb(result, client_id)

    async def BatchGenerate(self, request, context):
        engine = self.state.require_engine()
        limit = self.state.settings.max_batch_items
        if len(request.items) > limit:
            raise InvalidArgument(f"at most {limit} items per BatchGenerate call", field="items")
        deadline = convert.deadline_from_remaining(context.time_remaining())
        results = await asyncio.gather(*(self._batch_item(engine, i, item, deadline, context)
                                         for i, item in enumerate(request.items)))
        return inference_pb2.BatchGenerateResponse(results=results)

    async def ListModels(self, request, context):
        identity = current_identity()
        adapters = await asyncio.to_thread(self._usable_adapters, identity)
        base = convert.base_model_pb(self.state.base_fingerprint,
                                     self.state.settings.quantization)
        return inference_pb2.ListModelsResponse(
            base=base, adapters=[convert.adapter_pb(a) for a in adapters])

    # -- helpers ----------------------------------------------------------------------------
    def _request(self, request, context, field_prefix: str = ""):
        client_id = request.request_id or current_request_id() or uuid.uuid4().hex
        deadline = convert.deadline_from_remaining(context.time_remaining())
        gen = convert.request_from_pb(request, request_id=uuid.uuid4().hex,
                                      identity=current_identity(), deadline=deadline,
                                      field_prefix=field_prefix)
        return gen, client_id

    async def _batch_item(self, engine, index: int, item, deadline: float | None, context):
        """One item's outcome: its response, or the error it would have had alone."""
        prefix = f"items[{index}]."
        client_id = item.request_id or f"{current_request_id()}-{index}"
        try:
            gen = convert.request_from_pb(item, request_id=uuid.uuid4().hex,
                                          identity=current_identity(), deadline=deadline,
                                          field_prefix=prefix)
            with self._owned(engine, gen.request_id, context) as owned:
                result = await engine.submit(gen).result()
                owned.done = True
            return inference_pb2.BatchItemResult(response=convert.response_pb(result, client_id))
        except LoraplexError as e:
            mapped = grpc_errors.map_error(e)
            field = mapped.field if not mapped.field or mapped.field.startswith(prefix) \
                else prefix + mapped.field
            return inference_pb2.BatchItemResult(error=inference_pb2.ItemError(
                code=mapped.code.value[0], code_name=mapped.code.name, message=mapped.message,
                field=field or ""))

    def _usable_adapters(self, identity) -> list:
        """Newest version of every adapter the caller may use on this server's base."""
        registry, base = self.state.registry, self.state.base_fingerprint
        out, token = [], None
        while True:
            page, token = registry.list_adapters(identity, page_size=500, page_token=token)
            out += [a for a in page if base is None or a.base.digest == base.digest]
            if not token:
                return out

    @contextmanager
    def _owned(self, engine, request_id: str, context):
        """Cancel the engine request unless the body marked it done or the call's deadline
        ended it (the engine retires it by that deadline itself; see module doc)."""
        owned = _Owned()
        try:
            yield owned
        finally:
            if not owned.done and ended_by_client(context) != "DEADLINE_EXCEEDED":
                engine.cancel(request_id)


class _Owned:
    done = False


def _raise_if_cut_short(result) -> None:
    """A result the engine ended early becomes the status the caller expects."""
    if result.finish_reason == "deadline":
        raise DeadlineExceeded("the request's deadline passed before generation finished")
    if result.finish_reason == "cancelled":
        raise Cancelled("the request was cancelled")
