"""Derived versions: compress and merge as registry verbs with lineage.

    v = compress_version(reg, me, "acme/support@prod", rank=4)
    v = compress_version(reg, me, "acme/support:v3", energy=0.95, scope="global",
                         name="acme/support-small")
    m = merge_versions(reg, me, ["acme/a:v1", "acme/b:v2"], method="ties",
                       weights=[1, 1], density=0.5, name="acme/ab")

A derived adapter is an ordinary new, immutable version (pushed through the same validation
and content digest as any upload), on the same base as its inputs. Its lineage says what it
was derived from (every input's ref and digest) and how (method, parameters, and per module
the rank and share of spectral energy kept), so it can be derived again bit for bit.

Tenancy: every input must belong to the tenant of the output name. An input of another
tenant is refused with exactly the `NotFound` a missing adapter gets — also for admins,
who could read it, since a merge across tenants would publish one tenant's work under
another's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from loraplex.errors import IncompatibleAdapter, InvalidArgument, NotFound, quote
from loraplex.peft_format import PEFT_PREFIX
from loraplex.registry import algebra
from loraplex.registry.records import AdapterVersion, Identity
from loraplex.registry.refs import parse_key
from loraplex.registry.registry import Registry

PRODUCER = "loraplex.registry.algebra"


def _serialize(d: algebra.Derived) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes in peft's layout."""
    import json

    from safetensors.torch import save

    tensors = {PEFT_PREFIX + k: v for k, v in sorted(d.tensors.items())}
    config = json.dumps(d.config, indent=2, sort_keys=True).encode()
    return config, save(tensors)


def _input(reg: Registry, identity: Identity, ref: str, tenant: str) -> AdapterVersion:
    """Resolve an input of the output's tenant; anything else reads as missing."""
    v = reg.resolve(identity, ref)
    if v.tenant != tenant:
        raise NotFound(f"adapter {v.key} not found", field="ref")
    return v


def compress_version(reg: Registry, identity: Identity, ref: str, *, rank: int | None = None,
                     energy: float | None = None,
                     scope: Literal["module", "global"] = "module",
                     name: str | None = None) -> AdapterVersion:
    """Publish the truncated SVD of `ref` as the next version of `name` (default: the
    source's own name)."""
    src = reg.resolve(identity, ref)
    target = name or src.key
    tenant, _ = parse_key(target, field="name")
    if src.tenant != tenant:
        raise NotFound(f"adapter {src.key} not found", field="ref")
    loaded = reg.load_adapter(src)
    d = algebra.compress(loaded.config, loaded.tensors, rank=rank, energy=energy, scope=scope)
    params: dict[str, Any] = {"rank": rank} if rank is not None else \
        {"energy": energy, "scope": scope}
    lineage = {
        "producer": PRODUCER, "operation": "compress", "method": "truncated_svd",
        "parameters": params,
        "source": {"ref": src.ref, "digest": src.digest, "rank": src.rank},
        "inputs": [{"ref": src.ref, "digest": src.digest}],
        "modules": d.modules,
        "energy_kept": _overall_energy(d.modules),
        "ranks": sorted({m["rank"] for m in d.modules.values()}),
    }
    config, weights = _serialize(d)
    return reg.push_bytes(identity, target, config, weights, base=src.base, lineage=lineage)


def _overall_energy(modules: dict[str, dict[str, Any]]) -> float:
    """Share of the adapter's total ‖ΔW‖² kept (each module weighted by its own energy)."""
    total = sum(m["norm_fro"] ** 2 for m in modules.values())
    kept = sum(m["norm_fro"] ** 2 * m["energy_kept"] for m in modules.values())
    return round(kept / total, 6) if total else 1.0


def merge_versions(reg: Registry, identity: Identity, refs: Sequence[str], *, name: str,
                   method: str = "linear", weights: Sequence[float] | None = None,
                   density: float | None = None, svd_rank: int | None = None,
                   seed: int = 0) -> AdapterVersion:
    """Publish peft's `add_weighted_adapter(refs, weights, method)` as the next version of
    `name`. Inputs: one tenant (the output's), one base."""
    limits = {"max_rank": reg.settings.max_rank, "max_inputs": reg.settings.max_merge_inputs}
    algebra.check_merge_bounds(len(refs), svd_rank, **limits)
    tenant, _ = parse_key(name, field="name")
    inputs = [_input(reg, identity, r, tenant) for r in refs]
    seen: dict[str, str] = {}
    for r, v in zip(refs, inputs, strict=True):
        if v.digest in seen:  # peft would add it twice; say so instead of guessing
            raise InvalidArgument(f"{quote(r)} and {quote(seen[v.digest])} are the same "
                                  "version; give it once with the summed weight",
                                  field="refs")
        seen[v.digest] = r
    bases = {v.base.digest for v in inputs}
    if len(bases) > 1:
        listed = ", ".join(f"{v.ref} on {v.base.digest[:19]}" for v in inputs)
        raise IncompatibleAdapter(f"merge inputs must share one base: {listed}", field="refs")
    ws = list(weights) if weights else [1.0] * len(inputs)
    loaded = [reg.load_adapter(v) for v in inputs]
    d = algebra.merge([(x.config, x.tensors) for x in loaded], ws, method,
                      density=density, svd_rank=svd_rank, seed=seed, **limits)
    params: dict[str, Any] = {"weights": ws}
    if density is not None:
        params["density"] = density
    if method == "svd":
        params["svd_rank"] = svd_rank
    if method.startswith("dare"):
        params["seed"] = seed
    lineage = {
        "producer": PRODUCER, "operation": "merge", "method": method, "parameters": params,
        "inputs": [{"ref": v.ref, "digest": v.digest, "weight": w}
                   for v, w in zip(inputs, ws, strict=True)],
        "ranks": sorted({m["rank"] for m in d.modules.values()}),
    }
    config, tensors = _serialize(d)
    return reg.push_bytes(identity, name, config, tensors, base=inputs[0].base,
                          lineage=lineage)


def derived_sources(version: AdapterVersion) -> list[str]:
    """The refs a derived version was made from ([] for a trained one)."""
    return [i["ref"] for i in version.lineage.get("inputs", [])] \
        if version.lineage.get("producer") == PRODUCER else []


__all__ = ["compress_version", "merge_versions", "derived_sources"]
