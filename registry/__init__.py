"""The versioned adapter registry (`loraplex.registry`).

    from loraplex.registry import Registry, Identity
    reg = Registry.open("./.loraplex/registry")
    v = reg.push(Identity.system(), "./adapter", "acme/support", base="./base")

See DEVELOPERS.md ("Registry") for the contract other packages code against.
"""

from loraplex.registry.blobstore import BlobStore, LocalBlobStore
from loraplex.registry.records import (
    UNSET,
    AdapterVersion,
    AliasMove,
    Change,
    GcReport,
    Identity,
    LoadedAdapter,
)
from loraplex.registry.refs import AdapterRef, parse_key, parse_ref
from loraplex.registry.registry import Registry
from loraplex.registry.settings import DEFAULT_LOCATION, RegistrySettings

__all__ = [
    "UNSET", "AdapterRef", "AdapterVersion", "AliasMove", "BlobStore", "Change", "GcReport",
    "Identity", "LoadedAdapter", "LocalBlobStore", "Registry", "RegistrySettings",
    "DEFAULT_LOCATION", "parse_key", "parse_ref",
]
