"""RegistryService: register (streamed), inspect, alias and delete adapters; watch changes;
derive new versions (compress, merge).

Registry calls touch the database and the blob store, and derivations do tensor work on
every module of an adapter, so they all run in worker threads and never block the event
loop that serves generation streams: light reads on the default executor, uploads and
derivations on the state's heavy-registry pool (`ServingState.run_heavy`), so a flood of
them cannot starve inference admission.

An upload streams to a temporary directory on disk (`upload_spool_dir`) as its chunks
arrive, never into a list of chunks in memory, and is registered from there; the uploads
in progress are bounded globally and per tenant (`ServingState.uploads`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

from loraplex.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from loraplex.runtime.serve.change_hub import ChangeHub
from loraplex.runtime.serve.interceptors import current_identity
from loraplex.runtime.serve.servicers import convert
from loraplex.runtime.serve.servicers.state import ServingState
from loraplex.v1 import registry_pb2, registry_pb2_grpc


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.changes = ChangeHub(state.registry, stop_check_s=state.settings.watch_poll_s)

    @property
    def registry(self):
        return self.state.registry

    async def RegisterAdapter(self, request_iterator, context):
        identity = current_identity()
        spool = self.state.settings.upload_spool_dir
        try:
            with self.state.uploads.hold(identity.tenant), _spool_dir(spool) as folder:
                header = await self._receive(request_iterator, folder)
                version = await self.state.run_heavy(
                    self.registry.push, identity, folder, header.name,
                    base=self._base_for(header.base_digest),
                    lineage=convert.lineage_from_json(header.lineage_json))
        finally:
            self.state.released()
        return registry_pb2.RegisterAdapterResponse(adapter=convert.adapter_pb(version),
                                                    created=getattr(version, "created", True))

    async def GetAdapter(self, request, context):
        version = await asyncio.to_thread(self.registry.resolve, current_identity(),
                                          _required(request.ref, "ref"))
        return convert.adapter_pb(version)

    async def ListAdapters(self, request, context):
        size = convert.page_size(request.page_size)
        page, token = await asyncio.to_thread(
            self.registry.list_adapters, current_identity(), tenant=request.tenant or None,
            page_size=size, page_token=request.page_token or None)
        return registry_pb2.ListAdaptersResponse(adapters=[convert.adapter_pb(v) for v in page],
                                                 next_page_token=token or "")

    async def ListVersions(self, request, context):
        versions = await asyncio.to_thread(self.registry.list_versions, current_identity(),
                                           _required(request.adapter, "adapter"))
        return registry_pb2.ListVersionsResponse(versions=[convert.adapter_pb(v)
                                                           for v in versions])

    async def SetAlias(self, request, context):
        from loraplex.registry import UNSET

        which = request.WhichOneof("expected")
        expected = {"expected_version": request.expected_version, "expect_absent": None,
                    None: UNSET}[which]
        move = await asyncio.to_thread(self.registry.set_alias, current_identity(),
                                       _required(request.ref, "ref"),
                                       _required(request.alias, "alias"), expected=expected)
        return convert.alias_move_pb(move)

    async def DeleteVersion(self, request, context):
        await asyncio.to_thread(self.registry.delete_version, current_identity(),
                                _required(request.ref, "ref"), force=request.force)
        return registry_pb2.DeleteVersionResponse()

    async def WatchAdapters(self, request, context) -> AsyncIterator:
        """Forward the changes after `after_id` that the caller may see, read incrementally
        by the server's one `ChangeHub` (change_hub.py).

        Ends when the server drains, so that watchers never hold a graceful shutdown open.
        """
        identity = current_identity()
        async for change in self.changes.follow(request.after_id,
                                                stop=lambda: self.state.draining):
            if identity.can_access(change.tenant):
                yield convert.change_pb(change)

    async def CompressAdapter(self, request, context):
        from loraplex.registry.derive import compress_version

        which = request.WhichOneof("target")
        if which is None:
            raise InvalidArgument("give `rank` or `energy`", field="rank")
        scope = "global" if request.scope == registry_pb2.ENERGY_SCOPE_GLOBAL else "module"
        identity = current_identity()
        with self.state.derivations.hold(identity.tenant), self._releasing():
            version = await self.state.run_heavy(
                compress_version, self.registry, identity, _required(request.ref, "ref"),
                rank=request.rank if which == "rank" else None,
                energy=request.energy if which == "energy" else None, scope=scope,
                name=request.name.strip() or None)
        return _derived_pb(version)

    async def MergeAdapters(self, request, context):
        from loraplex.registry.derive import merge_versions

        if not request.refs:
            raise InvalidArgument("`refs` must name at least one version", field="refs")
        identity = current_identity()
        with self.state.derivations.hold(identity.tenant), self._releasing():
            version = await self.state.run_heavy(
                merge_versions, self.registry, identity, list(request.refs),
                name=_required(request.name, "name"), method=request.method or "linear",
                weights=list(request.weights) or None,
                density=request.density if request.HasField("density") else None,
                svd_rank=request.svd_rank or None, seed=request.seed)
        return _derived_pb(version)

    # -- helpers ----------------------------------------------------------------------------
    @contextmanager
    def _releasing(self) -> Iterator[None]:
        """Ask for freed memory to be given back once the work inside ends, however."""
        try:
            yield
        finally:
            self.state.released()

    async def _receive(self, request_iterator,
                       folder: Path) -> registry_pb2.RegisterAdapterHeader:
        """Header first, then weight chunks, refusing as soon as the size cap is passed. The
        config and the chunks are written to `folder` as peft's two files."""
        cap = self.state.settings.max_register_bytes
        header, size, chunks = None, 0, 0
        weights = open(folder / WEIGHTS_FILE, "wb")  # noqa: SIM115 - closed below
        try:
            async for message in request_iterator:
                part = message.WhichOneof("part")
                if header is None:
                    if part != "header":
                        raise InvalidArgument("the first message must be the header",
                                              field="header")
                    header = message.header
                    _required(header.name, "header.name")
                    if not header.adapter_config:
                        raise InvalidArgument("adapter_config (adapter_config.json) is required",
                                              field="header.adapter_config")
                    size = len(header.adapter_config)
                    if header.size_bytes + size > cap:
                        raise _too_big(cap)
                    continue
                if part != "chunk":
                    raise InvalidArgument("only one header per stream", field="header")
                chunk = message.chunk  # each read of the field copies it
                size += len(chunk)
                if size > cap:
                    raise _too_big(cap)
                chunks += 1
                await self.state.run_heavy(weights.write, chunk)
        finally:
            weights.close()
        if header is None:
            raise InvalidArgument("empty RegisterAdapter stream", field="header")
        if not chunks:
            raise InvalidArgument("no adapter_model.safetensors chunks sent", field="chunk")
        (folder / CONFIG_FILE).write_bytes(header.adapter_config)
        return header

    def _base_for(self, base_digest: str):
        """The server registers adapters for the base it serves (see registry.proto)."""
        served = self.state.base_fingerprint
        if base_digest and served is not None and base_digest != served.digest:
            raise FailedPrecondition(
                f"this server serves base {served.digest}, not {base_digest}; register the "
                "adapter where its base is served", field="header.base_digest")
        return served


CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class _spool_dir:
    """A private temporary directory (mode 0700) under `root`, removed on exit."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def __enter__(self) -> Path:
        if self.root is not None:
            os.makedirs(self.root, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="loraplex-upload-", dir=self.root))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _required(value: str, field: str) -> str:
    """`value` as sent (refs and names are never trimmed: `registry/refs.py`)."""
    if not value:
        raise InvalidArgument(f"`{field}` is required", field=field)
    return value


def _derived_pb(version) -> registry_pb2.DerivedAdapterResponse:
    return registry_pb2.DerivedAdapterResponse(adapter=convert.adapter_pb(version),
                                               created=getattr(version, "created", True))


def _too_big(cap: int) -> ResourceExhausted:
    return ResourceExhausted(f"adapter larger than the {cap}-byte registration cap",
                             field="chunk")
