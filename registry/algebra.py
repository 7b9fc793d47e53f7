"""Adapter algebra as pure tensor functions: SVD compression and peft-style merging.

A LoRA module computes ΔW = s·B·A (`B # [out, r]`, `A # [r, in]`, `s` = alpha/r or
alpha/√r). Everything here works on those factors and never builds the `[out, in]` ΔW:

- `factored_svd`: ΔW = U·diag(S)·Vh from QR(B) = Qb·Rb and QR(Aᵀ) = Qa·Ra, then the SVD of
  the small core s·Rb·Raᵀ (`[r, r]`): U = Qb·Uc, Vh = Vcᵀ·Qaᵀ. Cost O((out+in)·r²), exact
  (it is the SVD of ΔW, not an approximation of it).
- `compress`: keep the top-k singular triplets per module (Eckart–Young: the best rank-k
  approximation in Frobenius norm; the error is the norm of the discarded values).
- `merge`: the combinations of peft's `add_weighted_adapter` (linear, cat, svd, ties,
  dare_linear, dare_ties), written from its documented semantics and checked against it in
  tests/registry/test_algebra.py.

Scale convention of every derived adapter: the scale is folded into the factors and each
module gets scale 1, i.e. `lora_alpha = r` (and, where module ranks differ, `rank_pattern`
and `alpha_pattern` with equal values per module) and `use_rslora = false`. This is what
peft's own `add_weighted_adapter` writes (`lora_alpha = new_rank`), it keeps one rule for
every module whatever its rank, and it cannot be misread by a loader that ignores one of the
patterns (r and alpha always move together). Compressed factors split the singular values
evenly (B = U·√S, A = √S·Vh) so neither factor's magnitude dwarfs the other's in bf16/fp16;
the svd merge uses peft's split (B = U·S, A = Vh) so its factors compare with peft's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from loraplex import peft_format
from loraplex.errors import FailedPrecondition, InvalidArgument, quote
from loraplex.limits import MAX_MERGE_INPUTS, MAX_RANK

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
Method = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]


@dataclass(frozen=True)
class Module:
    """One LoRA module of an adapter: ΔW = scale · b @ a."""

    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class Derived:
    """A derived adapter: its peft config, its tensors (keys without peft's prefix, as
    `LoadedAdapter.tensors`), and what the lineage should say about each module."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    modules: dict[str, dict[str, Any]]


def modules_of(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Module]:
    """The (A, B, scale) of every module of a stored adapter, in path order; the scale is
    peft's, patterns included. A DoRA adapter raises FailedPrecondition (field `use_dora`)."""
    grouped = peft_format.pair_tensors(tensors)
    if grouped.dora or peft_format.uses_dora(config):
        raise FailedPrecondition(
            "a DoRA adapter (use_dora): its magnitude vector rescales each output feature of "
            "W + s·B·A, which compress, merge and export-merged do not carry, so they refuse "
            "it rather than drop the magnitude; serve the DoRA adapter as it is",
            field="use_dora")
    if grouped.unparsed or grouped.incomplete:
        bad = [quote(k) for k in grouped.unparsed] + [f"{quote(m)} (no lora_{h})"
                                                     for m, h in grouped.incomplete]
        raise InvalidArgument(f"not LoRA A/B pairs: {', '.join(bad[:5])}", field="tensors")
    scaling = peft_format.LoraScaling.from_config(config)
    return {path: Module(a=a, b=b, scale=scaling.scale(path))
            for path, (a, b) in sorted(grouped.pairs.items())}


# ------------------------------------------------------------------------------ SVD
def factored_svd(a: Tensor, b: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ΔW = scale·b@a without forming it, in float64.

    Semantics:  U, S, Vh = torch.linalg.svd(scale * b @ a); keep the first min(r, out, in)
    a # [r, in], b # [out, r] -> U # [out, k], S # [k] (descending), Vh # [k, in]
    """
    qb, rb = torch.linalg.qr(b.double())  # [out, m], [m, r]
    qa, ra = torch.linalg.qr(a.double().T)  # [in, n], [n, r]
    core = scale * rb @ ra.T  # [m, n]
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)  # [m, k], [k], [k, n]
    return qb @ uc, s, vch @ qa.T


def energy_share(s: Tensor, k: int) -> float:
    """Share of ‖ΔW‖_F² the top-k singular values keep (1.0 for an all-zero module)."""
    total = float((s.double() ** 2).sum())
    return 1.0 if total == 0.0 else float((s[:k].double() ** 2).sum()) / total


def ranks_for_energy(spectra: Mapping[str, Tensor], energy: float, *,
                     scope: Literal["module", "global"] = "module") -> dict[str, int]:
    """Smallest ranks keeping `energy` of the spectral energy (each module at least 1).

    "module": per module, the smallest k whose top-k share is >= energy.
    "global": the largest singular values over all modules together until their share of
    the adapter's total energy is >= energy; a module's rank is how many of its own made it.
    """
    if not 0.0 < energy <= 1.0:
        raise InvalidArgument(f"energy must be in (0, 1], got {energy}", field="energy")
    eps = 1e-12
    if scope == "module":
        out = {}
        for path, s in spectra.items():
            cum = torch.cumsum(s.double() ** 2, 0)  # [k]
            total = float(cum[-1]) if len(cum) else 0.0
            need = energy * total - eps * max(total, 1.0)
            out[path] = max(1, int((cum < need).sum()) + 1) if total > 0 else 1
            out[path] = min(out[path], len(s)) if len(s) else 1
        return out
    if scope != "global":
        raise InvalidArgument(f"scope must be 'module' or 'global', got {quote(scope)}",
                              field="scope")
    pool = sorted(((float(v) ** 2, path) for path, s in spectra.items() for v in s),
                  key=lambda e: -e[0])
    total = sum(e for e, _ in pool)
    counts = dict.fromkeys(spectra, 0)
    kept = 0.0
    for e, path in pool:
        if kept >= energy * total - eps * max(total, 1.0):
            break
        kept += e
        counts[path] += 1
    return {p: max(1, c) for p, c in counts.items()}


def compress(config: Mapping[str, Any], tensors: Mapping[str, Tensor], *,
             rank: int | None = None, energy: float | None = None,
             scope: Literal["module", "global"] = "module") -> Derived:
    """Truncated SVD of every module at `rank` (capped by the module's own rank), or at the
    smallest ranks keeping `energy` (per module or over the whole adapter)."""
    if (rank is None) == (energy is None):
        raise InvalidArgument("give exactly one of rank or energy", field="rank")
    if rank is not None and rank < 1:
        raise InvalidArgument(f"rank must be >= 1, got {rank}", field="rank")
    mods = modules_of(config, tensors)
    svds = {p: factored_svd(m.a, m.b, m.scale) for p, m in mods.items()}
    if rank is not None:
        ranks = {p: max(1, min(rank, len(svds[p][1]))) for p in mods}
    else:
        ranks = ranks_for_energy({p: s for p, (_, s, _) in svds.items()}, float(energy),
                                 scope=scope)
    out: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for path, m in mods.items():
        u, s, vh = svds[path]
        k = ranks[path]
        root = s[:k].sqrt()  # [k]
        dtype = m.a.dtype
        out[f"{path}.lora_A.weight"] = (root[:, None] * vh[:k]).to(dtype).contiguous()
        out[f"{path}.lora_B.weight"] = (u[:, :k] * root[None, :]).to(dtype).contiguous()
        info[path] = {"rank_in": m.rank, "rank": k, "energy_kept": round(energy_share(s, k), 6),
                      "norm_fro": round(float(s.double().norm()), 8),
                      "error_fro": round(float(s[k:].double().norm()), 8)}
    return Derived(derived_config(config, ranks), out, info)


def derived_config(source: Mapping[str, Any], ranks: Mapping[str, int],
                   target_modules: Any = None) -> dict[str, Any]:
    """`source`'s config with scale 1 per module (see the module docstring): r = the largest
    rank, lora_alpha = r, and rank/alpha patterns (exact, escaped module paths) for the
    modules whose rank is smaller."""
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in sorted(ranks.items()) if k != r}
    cfg = {k: v for k, v in source.items() if k not in ("rank_pattern", "alpha_pattern")}
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=pattern,
               alpha_pattern=dict(pattern))
    if target_modules is not None:
        cfg["target_modules"] = target_modules
    return cfg


# ------------------------------------------------------------------------------ merging
def _pruned(t: Tensor, density: float, how: str, gen: torch.Generator | None) -> Tensor:
    """peft's `prune`: keep the top `density` share by magnitude, or a random share
    (rescaled by 1/density so the expectation is unchanged); density >= 1 keeps all."""
    if density >= 1:
        return t
    if how == "magnitude":
        k = int(density * t.numel())
        mask = torch.zeros(t.numel(), dtype=t.dtype)  # [numel]
        mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
        return t * mask.reshape(t.shape)
    keep = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * keep / density


def combine(ts: Sequence[Tensor], weights: Sequence[float], method: str,
            density: float = 1.0, gen: torch.Generator | None = None) -> Tensor:
    """Combine same-shape task tensors the way peft's merge_utils do.

    Semantics:
      linear:       Σ w_i t_i
      ties:         t_i' = top-density(t_i); keep entries whose sign agrees with the sign of
                    Σ w_i t_i'; their sum divided by how many were kept (disjoint mean)
      dare_linear:  t_i' = bernoulli(density) ⊙ t_i / density; Σ w_i t_i'
      dare_ties:    the dare pruning, then the ties sign election and disjoint mean
    """
    how = "random" if method.startswith("dare") else "magnitude"
    if method != "linear":
        ts = [_pruned(t, density, how, gen) for t in ts]
    stacked = torch.stack(list(ts))  # [N, *shape]
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *[1] * (stacked.dim() - 1))
    weighted = stacked * w
    if method in ("linear", "dare_linear"):
        return weighted.sum(0)
    if method not in ("ties", "dare_ties"):
        raise InvalidArgument(f"unknown merge method {quote(method)}", field="method")
    sign = stacked.sign()
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = sign == majority  # [N, *shape]
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge(inputs: Sequence[tuple[Mapping[str, Any], Mapping[str, Tensor]]],
          weights: Sequence[float], method: str, *, density: float | None = None,
          svd_rank: int | None = None, seed: int = 0, max_rank: int = MAX_RANK,
          max_inputs: int = MAX_MERGE_INPUTS) -> Derived:
    """peft's `add_weighted_adapter(adapters, weights, combination_type=method)` on stored
    adapters. Modules an input lacks are simply not part of that input's sum. Bounds are
    checked before any tensor work: at most `max_inputs` inputs, an output rank (`svd_rank`,
    or the sum of the inputs' ranks for `cat`) of at most `max_rank`."""
    if method not in METHODS:
        raise InvalidArgument(f"method must be one of {', '.join(METHODS)}, got {quote(method)}",
                              field="method")
    check_merge_bounds(len(inputs), svd_rank, max_rank=max_rank, max_inputs=max_inputs)
    if len(weights) != len(inputs):
        raise InvalidArgument(f"{len(inputs)} adapters need {len(inputs)} weights, got "
                              f"{len(weights)}", field="weights")
    if method in ("ties", "dare_linear", "dare_ties") and len(inputs) > 1:
        if density is None or not 0.0 < density <= 1.0:
            raise InvalidArgument(f"method {method} needs a density in (0, 1]", field="density")
    if len(inputs) == 1:
        method = "linear"  # as peft: one adapter can only be scaled
    mods = [modules_of(cfg, ts) for cfg, ts in inputs]
    max_ranks = [max(m.rank for m in ms.values()) for ms in mods]
    if method in ("linear", "ties", "dare_linear", "dare_ties") and len(set(max_ranks)) > 1:
        raise InvalidArgument(f"method {method} needs adapters of one rank, got "
                              f"{sorted(set(max_ranks))}; use cat or svd", field="method")
    new_rank = sum(max_ranks) if method == "cat" else (svd_rank or max(max_ranks)) \
        if method == "svd" else max_ranks[0]
    if new_rank > max_rank:
        raise InvalidArgument(f"method {method} would make rank {new_rank}, above the "
                              f"maximum {max_rank}; use svd with svd_rank <= {max_rank}",
                              field="svd_rank" if method == "svd" else "method")
    gen = torch.Generator().manual_seed(seed)
    paths = sorted({p for ms in mods for p in ms})
    out: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    info: dict[str, dict[str, Any]] = {}
    for path in paths:
        present = [(ms[path], w) for ms, w in zip(mods, weights, strict=True) if path in ms]
        a, b = _merge_module(present, method, new_rank, density or 1.0, gen)
        dtype = present[0][0].a.dtype
        out[f"{path}.lora_A.weight"] = a.to(dtype).contiguous()
        out[f"{path}.lora_B.weight"] = b.to(dtype).contiguous()
        ranks[path] = int(a.shape[0])
        info[path] = {"inputs": len(present), "rank": ranks[path]}
    cfg = derived_config(inputs[0][0], ranks, _union_targets([c for c, _ in inputs]))
    return Derived(cfg, out, info)


def check_merge_bounds(n_inputs: int, svd_rank: int | None, *, max_rank: int = MAX_RANK,
                       max_inputs: int = MAX_MERGE_INPUTS) -> None:
    """What a merge may ask for, checked before anything is loaded."""
    if not 1 <= n_inputs <= max_inputs:
        raise InvalidArgument(f"a merge combines 1 to {max_inputs} adapters, got {n_inputs}",
                              field="refs")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                                 or not 1 <= svd_rank <= max_rank):
        raise InvalidArgument(f"svd_rank must be an integer in [1, {max_rank}], got "
                              f"{quote(svd_rank)}", field="svd_rank")


def _merge_module(present: list[tuple[Module, float]], method: str, new_rank: int,
                  density: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(A # [k, in], B # [out, k]) of one merged module, scale 1."""
    if method in ("cat", "svd"):
        # Σ w_i s_i B_i A_i == cat(B_i) @ cat(w_i s_i A_i): the exact weighted sum, low rank.
        a = torch.cat([m.a.double() * (w * m.scale) for m, w in present])  # [Σr, in]
        b = torch.cat([m.b.double() for m, _ in present], dim=1)  # [out, Σr]
        if method == "cat":
            return _pad_rank(a, b, new_rank)
        u, s, vh = factored_svd(a, b, 1.0)
        k = min(new_rank, len(s))
        return _pad_rank(vh[:k], u[:, :k] * s[None, :k], new_rank)
    ranks = {m.rank for m, _ in present}
    if len(ranks) > 1:
        raise InvalidArgument(f"method {method} needs one rank per module, got {sorted(ranks)}",
                              field="method")
    # peft splits each weight w·s as √|w·s| onto A (with the sign) and B, then combines
    # the A's and the B's separately: an approximation of the weighted sum of ΔWs.
    ws = [w * m.scale for m, w in present]
    wa = [math.copysign(math.sqrt(abs(x)), x) if x != 0 else 0.0 for x in ws]
    wb = [math.sqrt(abs(x)) for x in ws]
    a = combine([m.a.float() for m, _ in present], wa, method, density, gen)
    b = combine([m.b.float() for m, _ in present], wb, method, density, gen)
    return a, b


def _pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows/columns up to `rank` (peft allocates the merged module at the new rank)."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))


def _union_targets(configs: Sequence[Mapping[str, Any]]) -> Any:
    """peft's rule: lists are united; regex strings are OR-ed; a mix is refused."""
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, str) for t in targets):
        return targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    if all(isinstance(t, list) for t in targets):
        return sorted({x for t in targets for x in t})
    raise InvalidArgument("cannot merge adapters whose target_modules mix a regex and a list",
                          field="target_modules")
