"""What every servicer shares: the engine, the registry, the settings and the serving state.

Readiness and draining are read from the engine — the one place they live (`Engine.ready`,
`Engine.draining`, flipped by `Engine.start` and `Engine.drain`) — so health, intake and
a SIGTERM drain can never disagree. Only a registry-only server (no engine) keeps its own
draining flag, since nothing else could hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.errors import Unavailable
from loraplex.runtime.api.surface import EngineClient


@dataclass
class ServingState:
    registry: Any  # loraplex.registry.Registry
    engine: EngineClient | None  # Engine or fleet's RayEngine; None: registry-only server
    settings: Any  # ServerSettings
    base_fingerprint: Any | None = None  # BaseFingerprint of the served base, once known
    _registry_only_draining: bool = False

    @property
    def ready(self) -> bool:
        """The engine has loaded the base and is not stopped (it may be draining)."""
        return self.engine is not None and bool(self.engine.ready)

    @property
    def draining(self) -> bool:
        if self.engine is not None:
            return bool(self.engine.draining)
        return self._registry_only_draining

    def begin_drain(self) -> None:
        """Stop admitting new work now (in-flight requests keep running): the engine's
        `drain` with no wait, which flips `engine.draining` before it returns."""
        if self.engine is not None:
            self.engine.drain(0.0)
        else:
            self._registry_only_draining = True

    def require_engine(self) -> EngineClient:
        """The engine, if this server may admit generation work now."""
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")
        if self.engine is None:
            raise Unavailable("this server has no engine (registry-only)")
        if not self.ready:
            raise Unavailable("the base model is still loading; retry shortly")
        return self.engine
