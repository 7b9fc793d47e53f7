"""Both engines a door can hold offer every call of `EngineClient`."""

from __future__ import annotations

import inspect

import pytest

from loraplex.runtime.api.surface import AdminPort, EngineClient, GenerationStream
from loraplex.runtime.engine.commands import AdminCommands
from loraplex.runtime.engine.engine import Engine
from loraplex.runtime.engine.stream import RequestStream
from loraplex.runtime.fleet.ray_ingress import RayAdmin, RayEngine, RayStream


def members(protocol: type) -> set[str]:
    """The calls a Protocol names (its public attributes, and `__aiter__`)."""
    return {name for name in vars(protocol)
            if not name.startswith("_") or name == "__aiter__"}


@pytest.mark.parametrize(("protocol", "impl"), [
    (EngineClient, Engine), (EngineClient, RayEngine),
    (AdminPort, AdminCommands), (AdminPort, RayAdmin),
    (GenerationStream, RequestStream), (GenerationStream, RayStream),
])
def test_implementation_offers_every_call(protocol, impl):
    missing = sorted(m for m in members(protocol) if not hasattr(impl, m))
    assert not missing, f"{impl.__name__} lacks {missing} of {protocol.__name__}"
    for name in members(protocol):
        want = getattr(protocol, name)
        have = getattr(impl, name)
        if inspect.isfunction(want):
            assert callable(have), f"{impl.__name__}.{name} is not callable"
            wanted = [p for p in inspect.signature(want).parameters if p != "self"]
            offered = inspect.signature(have).parameters
            assert all(p in offered for p in wanted), (impl.__name__, name, wanted)
