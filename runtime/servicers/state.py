"""What every servicer shares: the engine, the registry, the settings and the serving state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplex.errors import Unavailable


@dataclass
class ServingState:
    """Mutable only by the server (`server.py`): readiness and draining flip once each."""

    registry: Any  # loraplex.registry.Registry
    engine: Any | None  # loraplex.runtime.engine.Engine; None: registry-only server
    settings: Any  # ServerSettings
    base_fingerprint: Any | None = None  # BaseFingerprint of the served base, once known
    ready: bool = False
    draining: bool = False

    def require_engine(self) -> Any:
        """The engine, if this server may admit generation work now."""
        if self.draining:
            raise Unavailable("server is draining; retry on another replica")
        if self.engine is None:
            raise Unavailable("this server has no engine (registry-only)")
        if not self.ready:
            raise Unavailable("the base model is still loading; retry shortly")
        return self.engine
