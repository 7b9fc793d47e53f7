"""`loraplex registry compress|merge` and `loraplex export`: derived versions from the CLI.

    loraplex registry compress acme/support@prod --rank 4 --name acme/support-r4
    loraplex registry compress acme/support:v3 --energy 0.95 --global
    loraplex registry merge acme/a acme/b --method ties --weights 1,1 --density 0.5 \\
        --name acme/ab --alias prod --gate "exact_match>=0.9*source" --gate-data test.jsonl
    loraplex export acme/support@prod ./merged --merged --dtype bfloat16

With `--alias`, the alias moves to the new version only after the gate (if given) passed; a
failed gate leaves the version registered but unpromoted, prints one line saying why on
stderr and exits 1. Passed or failed, the gate's scores and verdict are recorded beside the
new version (`Registry.record_evaluation`, name "gate"), where the console shows them. The gate is the trainer's evaluation: the registry does not import the
trainer, so the `loraplex` command hands one in (`use_gate_runner`, from `trainer/cli.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Protocol

import typer

from loraplex.errors import FailedPrecondition, InvalidArgument, quote
from loraplex.registry.cli import (
    DEFAULT_REGISTRY,
    BlobDirOpt,
    JsonOpt,
    RegistryOpt,
    Session,
    TokenOpt,
    app,
    session,
    version_dict,
)
from loraplex.registry.records import AdapterVersion, Identity


class GateOutcome(Protocol):
    passed: bool
    reason: str  # one line
    new: dict[str, float]  # the new version's metrics
    sources: dict[str, dict[str, float]]  # each source ref's metrics


class GateRunner(Protocol):
    """Scores a derived version against its sources (`trainer/cli.py` has the one)."""

    def check(self, gate: str) -> None:
        """Raise `InvalidArgument` for a malformed gate expression."""

    def run(self, reg: Any, identity: Identity, gate: str, new_ref: str,
            source_refs: list[str], data: Path, base_dir: Path,
            max_examples: int) -> GateOutcome:
        """Evaluate `new_ref` and the sources on `data`; the outcome of `gate`."""


_gate_runner: GateRunner | None = None


def use_gate_runner(runner: GateRunner) -> None:
    """Make `--gate` work: the `loraplex` command passes the trainer's evaluation here."""
    global _gate_runner
    _gate_runner = runner

# ------------------------------------------------------------------------- algebra
NameOpt = Annotated[str | None, typer.Option(
    "--name", help="tenant/name to publish as (compress: default the source's name).")]
AliasOpt = Annotated[str | None, typer.Option(
    "--alias", help="Alias to move to the new version (after the gate, if any).")]
GateOpt = Annotated[str | None, typer.Option(
    "--gate", help="'exact_match>=0.9*source', 'loss<=1.05*source' or 'exact_match>=0.8'.")]
GateDataOpt = Annotated[Path | None, typer.Option(
    "--gate-data", help="JSONL the gate scores on (needed with --gate).")]
GateMaxOpt = Annotated[int, typer.Option(
    "--gate-max-examples", help="Score only the first N examples (0: all).")]
BaseDirOpt = Annotated[str | None, typer.Option(
    "--base", help="Base model dir (default: a registered directory of the adapter's base).")]


@app.command()
def compress(
    ref: Annotated[str, typer.Argument(help="Version to compress.")],
    rank: Annotated[int | None, typer.Option("--rank", help="Target rank per module.")] = None,
    energy: Annotated[float | None, typer.Option(
        "--energy", help="Keep this share of spectral energy, e.g. 0.95.")] = None,
    per_module: Annotated[bool, typer.Option(
        "--per-module/--global", help="Energy share per module, or over the whole adapter.")
    ] = True,
    name: NameOpt = None, alias: AliasOpt = None, gate: GateOpt = None,
    gate_data: GateDataOpt = None, gate_max_examples: GateMaxOpt = 0, base: BaseDirOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Truncated SVD of every module (rank K or an energy share) as a new version."""
    from loraplex.registry.derive import compress_version

    with session(registry, blob_dir, token, as_json) as s:
        _check_gate_args(gate, gate_data)
        v = compress_version(s.reg, s.me, ref, rank=rank, energy=energy,
                             scope="module" if per_module else "global", name=name)
        _finish_derived(s, v, alias, gate, gate_data, gate_max_examples, base)


@app.command()
def merge(
    refs: Annotated[list[str], typer.Argument(help="Versions to combine (same tenant, base).")],
    name: Annotated[str, typer.Option("--name", help="tenant/name to publish as.")],
    method: Annotated[str, typer.Option(
        help="linear | cat | svd | ties | dare_linear | dare_ties (peft's semantics).")
    ] = "linear",
    weights: Annotated[str | None, typer.Option(
        help="Comma list, one per adapter (default all 1).")] = None,
    density: Annotated[float | None, typer.Option(
        help="Share of values kept (ties, dare_*).")] = None,
    svd_rank: Annotated[int | None, typer.Option(
        "--svd-rank", help="Rank of an svd merge (default the largest input rank).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of dare's random mask.")] = 0,
    alias: AliasOpt = None, gate: GateOpt = None, gate_data: GateDataOpt = None,
    gate_max_examples: GateMaxOpt = 0, base: BaseDirOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Combine adapters as peft's add_weighted_adapter does, as a new version."""
    from loraplex.registry.derive import merge_versions

    with session(registry, blob_dir, token, as_json) as s:
        _check_gate_args(gate, gate_data)
        v = merge_versions(s.reg, s.me, refs, name=name, method=method,
                           weights=_parse_weights(weights), density=density,
                           svd_rank=svd_rank, seed=seed)
        _finish_derived(s, v, alias, gate, gate_data, gate_max_examples, base)


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise InvalidArgument(f"--weights {quote(text)}: write numbers separated by commas",
                              field="weights") from None


def _check_gate_args(gate: str | None, gate_data: Path | None) -> None:
    if gate is not None and gate_data is None:
        raise InvalidArgument("--gate needs --gate-data (a JSONL file to score on)",
                              field="gate_data")
    if gate is not None:
        _runner().check(gate)  # refuse a malformed gate before any work is done


def _runner() -> GateRunner:
    if _gate_runner is None:
        raise FailedPrecondition("--gate needs the trainer's evaluation, which the `loraplex` "
                                 "command provides: run `loraplex registry …`", field="gate")
    return _gate_runner


def _finish_derived(s: Session, v: AdapterVersion, alias: str | None, gate: str | None,
                    gate_data: Path | None, max_examples: int, base: str | None) -> None:
    """Report the new version; run the gate; move the alias only if it passed."""
    from loraplex.registry.derive import derived_sources

    said = (f"registered {v.ref} {v.digest}" if v.created
            else f"{v.ref} already holds this content ({v.digest}); nothing registered")
    data = version_dict(v)
    outcome = None
    if gate is not None and gate_data is not None:
        from loraplex.registry.export import base_dir_for

        outcome = _runner().run(s.reg, s.me, gate, v.ref, derived_sources(v), gate_data,
                                base_dir_for(s.reg, v.base, base), max_examples)
        data["gate"] = {"passed": outcome.passed, "reason": outcome.reason,
                        "new": outcome.new, "sources": outcome.sources}
        s.reg.record_evaluation(s.me, v.ref, "gate", outcome.new,
                                data_digest=_file_digest(gate_data),
                                detail={"gate": gate, "data": str(gate_data), **data["gate"]})
    promoted = False
    if alias is not None and (outcome is None or outcome.passed):
        move = s.reg.set_alias(s.me, v.ref, alias)
        promoted = True
        said += f"\n{move.tenant}/{move.name}@{alias}: {_vname(move.from_version)} → v{v.version}"
    data["promoted"] = promoted
    if outcome is not None and outcome.passed:
        said += f"\ngate passed: {outcome.reason}"
    s.emit(data, said)
    if outcome is not None and not outcome.passed:
        where = f"; {alias} not moved" if alias else ""
        typer.echo(f"gate failed: {outcome.reason}{where}", err=True)
        raise typer.Exit(1)


def _file_digest(path: Path) -> str:
    """sha256 of the scored file, as the trainer names data (`trainer.data`)."""
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _vname(n: int | None) -> str:
    return "nothing" if n is None else f"v{n}"


def export_command(
    ref: Annotated[str, typer.Argument(help="Version to export.")],
    out: Annotated[Path, typer.Argument(help="Directory to write (must be empty or new).")],
    merged: Annotated[bool, typer.Option(
        "--merged", help="Fold the adapter into the base: a plain HF model directory.")
    ] = False,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 (--merged).")
                     ] = "float32",
    base: BaseDirOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Export a version: the peft files, or (--merged) the base with the adapter folded in."""
    from loraplex.registry.export import export_merged

    with session(registry, blob_dir, token, as_json) as s:
        if not merged:
            v = s.reg.resolve(s.me, ref)
            path = s.reg.pull(s.me, v.ref, out)
        else:
            v, path = export_merged(s.reg, s.me, ref, out, dtype=dtype, base=base)
        s.emit({"ref": v.ref, "digest": v.digest, "dir": str(path), "merged": merged},
               f"wrote {v.ref} {'merged into its base ' if merged else ''}to {path}")


def register(root: typer.Typer) -> None:
    """Attach the top-level `loraplex export` to the root command."""
    root.command("export", help="Export a version (peft files, or --merged into the base).")(
        export_command)
