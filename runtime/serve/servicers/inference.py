"""InferenceService: Generate, GenerateStream, BatchGenerate, ListModels.

A generation RPC owns one engine request. Whatever ends the RPC early — the client cancels,
its deadline passes, the server shuts down — the `finally` of `_owned` cancels the engine
request, so its sequence slot and KV rows are freed at once instead of decoding for no one.
The client's deadline is handed to the engine (`GenerationRequest.deadline`): a queued
request past it never starts, and a call its deadline ended is left to the engine, which ends
it by that same deadline within a step, so it is counted as `deadline`, not `cancelled`.

Intake happens here, at the edge, off the event loop: the ref is resolved in the registry
(authorization included) and the prompt tokenized in a worker thread (`asyncio.to_thread`),
so a slow database or a busy tokenizer never stalls other calls; the engine receives the
resolved version and the prompt ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import contextmanager

from loraplex.errors import Cancelled, DeadlineExceeded, InvalidArgument, LoraplexError
from loraplex.runtime.serve import grpc_errors
from loraplex.runtime.serve.interceptors import (
    current_identity,
    current_request_id,
    ended_by_client,
    plain_request_id,
)
from loraplex.runtime.serve.servicers import convert
from loraplex.runtime.serve.servicers.state import ServingState
from loraplex.v1 import inference_pb2, inference_pb2_grpc

# BatchGenerate hands the engine a deadline this much (at most 10% of the time) before the
# caller's, so the reply — with DEADLINE_EXCEEDED in the error of each item that ran out —
# reaches the caller before the call itself expires and the finished items are not lost.
BATCH_REPLY_MARGIN_S = 0.25


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state

    async def Generate(self, request, context):
        engine = self.state.require_engine()
        gen, client_id = await self._admit(engine, request, context)
        with self._owned(engine, gen.request_id, context) as owned:
            result = await engine.submit(gen).result()
            owned.done = True
        _raise_if_cut_short(result)
        return convert.response_pb(result, client_id)

    async def GenerateStream(self, request, context) -> AsyncIterator:
        engine = self.state.require_engine()
        gen, client_id = await self._admit(engine, request, context)
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
        deadline = convert.deadline_from_remaining(context.time_remaining(),
                                                   margin_s=BATCH_REPLY_MARGIN_S)
        results = await asyncio.gather(*(self._batch_item(engine, i, item, context, deadline)
                                         for i, item in enumerate(request.items)))
        return inference_pb2.BatchGenerateResponse(results=results)

    async def ListModels(self, request, context):
        size = convert.page_size(request.page_size)
        adapters, token = await asyncio.to_thread(self._usable_adapters, current_identity(),
                                                  size, request.page_token or None)
        base = convert.base_model_pb(self.state.base_fingerprint,
                                     self.state.settings.quantization)
        return inference_pb2.ListModelsResponse(
            base=base, adapters=[convert.adapter_pb(a) for a in adapters],
            next_page_token=token or "")

    # -- helpers ----------------------------------------------------------------------------
    async def _admit(self, engine, request, context, *, client_id: str | None = None,
                     field_prefix: str = "", deadline: float | None = None):
        """(GenerationRequest, client-facing request id): resolved and tokenized in a worker
        thread (registry reads and the tokenizer lock stay off the event loop)."""
        if request.request_id and not plain_request_id(request.request_id):
            raise InvalidArgument(f"{field_prefix}request_id must be 1-128 characters of "
                                  "A-Z a-z 0-9 . _ : -", field=f"{field_prefix}request_id")
        client_id = client_id or request.request_id or current_request_id() or uuid.uuid4().hex
        if deadline is None:
            deadline = convert.deadline_from_remaining(context.time_remaining())
        args = convert.admit_args_from_pb(request, field_prefix=field_prefix)
        gen = await asyncio.to_thread(engine.admit, uuid.uuid4().hex, current_identity(),
                                      deadline=deadline, **args)
        return gen, client_id

    async def _batch_item(self, engine, index: int, item, context, deadline: float | None):
        """One item's outcome: its response, or the error it would have had alone (a
        deadline or cancel included, exactly as `Generate` reports it)."""
        prefix = f"items[{index}]."
        client_id = item.request_id or f"{current_request_id()}-{index}"
        try:
            gen, client_id = await self._admit(engine, item, context, client_id=client_id,
                                               field_prefix=prefix, deadline=deadline)
            with self._owned(engine, gen.request_id, context) as owned:
                result = await engine.submit(gen).result()
                owned.done = True
            _raise_if_cut_short(result)
            return inference_pb2.BatchItemResult(response=convert.response_pb(result, client_id))
        except LoraplexError as e:
            mapped = grpc_errors.map_error(e)
            field = mapped.field if not mapped.field or mapped.field.startswith(prefix) \
                else prefix + mapped.field
            return inference_pb2.BatchItemResult(error=inference_pb2.ItemError(
                code=mapped.code.value[0], code_name=mapped.code.name, message=mapped.message,
                field=field or ""))

    def _usable_adapters(self, identity, size: int, token: str | None) -> tuple[list, str | None]:
        """One registry page (keyset: the same cost at any position) of the newest
        versions the caller may see, less those for another base; the registry's token."""
        base = self.state.base_fingerprint
        page, token = self.state.registry.list_adapters(identity, page_size=size,
                                                        page_token=token)
        return [a for a in page if base is None or a.base.digest == base.digest], token

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
