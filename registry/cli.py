"""`loraplex registry …`: the registry from the command line.

    loraplex registry base add ./base
    loraplex registry push ./adapter --name acme/support [--base ./base]
    loraplex registry list [acme/support]            # adapters, or one adapter's versions
    loraplex registry show acme/support@prod
    loraplex registry alias acme/support:v2 prod --expect v1
    loraplex registry pull acme/support@prod ./out
    loraplex registry rm acme/support:v1 [--force]
    loraplex registry verify && loraplex registry gc
    loraplex registry token create acme [--scope inference|publish|admin] [--ttl 30d]
    loraplex registry token list [acme] | revoke tok_… | rotate tok_… [--grace 1h] | history
    loraplex registry token purge [acme] [--older-than 7d]
    loraplex registry compress acme/support@prod --rank 4 [--alias prod --gate … --gate-data …]
    loraplex registry merge acme/a acme/b --method ties --density 0.5 --name acme/ab

Every command takes `--registry` (or `$LORAPLEX_REGISTRY`; default `.loraplex/registry`),
a directory or a database URL, and `--json` for scripts. Identity: with `--token` (or
`$LORAPLEX_TOKEN`) the command acts as that token's tenant; without one it acts as the
system admin, because whoever can run this locally can already open the database and
blob files directly — tokens protect the network API, not the files.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from loraplex.cli_errors import ErrorHandlingGroup, json_errors
from loraplex.errors import InvalidArgument, quote
from loraplex.registry.records import UNSET, AdapterVersion, AliasMove, Identity
from loraplex.registry.registry import Registry
from loraplex.registry.settings import DEFAULT_LOCATION

DEFAULT_REGISTRY = DEFAULT_LOCATION

app = typer.Typer(help="Versioned LoRA adapter registry.", no_args_is_help=True,
                  cls=ErrorHandlingGroup)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
base_app = typer.Typer(help="Base models adapters are checked against.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(base_app, name="base")

RegistryOpt = Annotated[str, typer.Option(
    "--registry", envvar="LORAPLEX_REGISTRY", help="Registry directory or database URL.")]
BlobDirOpt = Annotated[str | None, typer.Option(
    "--blob-dir", envvar="LORAPLEX_BLOB_DIR", help="Blob directory (for a database URL).")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar="LORAPLEX_TOKEN", help="Act as this token's tenant (default: admin).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.",
                                       callback=json_errors)]


class Session:
    """What a command works with: the open registry, the caller, the output mode."""

    def __init__(self, reg: Registry, me: Identity, as_json: bool) -> None:
        self.reg, self.me, self.as_json = reg, me, as_json
        self.console = Console(highlight=False, soft_wrap=True)

    def emit(self, data: Any, human: Any) -> None:
        """Print `data` as JSON, or `human` (a rich renderable or str) for people."""
        if self.as_json:
            typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            self.console.print(human)


@contextmanager
def session(registry: str, blob_dir: str | None, token: str | None,
             as_json: bool) -> Iterator[Session]:
    """Open the registry and authenticate. A typed error anywhere in the command is
    printed by the CLI's one handler (`loraplex/cli_errors.py`), as JSON too with --json."""
    with Registry.open(registry, blob_dir=blob_dir) as reg:
        me = reg.authenticate(token) if token else Identity.system()
        yield Session(reg, me, as_json)


def version_dict(v: AdapterVersion) -> dict[str, Any]:
    return v.manifest() | {"created": v.created}


def _versions_table(title: str, vs: list[AdapterVersion]) -> Table:
    table = Table(title=title)
    table.add_column("ref", no_wrap=True)
    for col in ("digest", "r", "alpha", "modules", "dtype", "size", "base", "created"):
        table.add_column(col)
    for v in vs:
        table.add_row(v.ref, v.digest[7:19], str(v.rank), f"{v.alpha:g}",
                      ",".join(v.target_modules), v.dtype, _size(v.size_bytes),
                      f"{v.base.model_type} {v.base.digest[7:15]}",
                      f"{v.created_at:%Y-%m-%d %H:%M}")
    return table


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:g} {unit}"
        n = round(n / 1024, 1)
    return f"{n:g} GiB"


def _move_dict(m: AliasMove) -> dict[str, Any]:
    return {"alias": m.alias, "from": m.from_version, "to": m.to_version,
            "at": m.at.isoformat(), "by": m.by}


def _parse_expect(text: str | None) -> Any:
    """`--expect v3` / `3` (must point there), `none` (must not exist), unset (any)."""
    if text is None:
        return UNSET
    if text.lower() in ("none", "null", "-"):
        return None
    digits = text[1:] if text.lower().startswith("v") else text
    if not digits.isdigit() or int(digits) < 1:
        raise InvalidArgument(f"--expect {quote(text)}: write a version like v3, or 'none'",
                              field="expected")
    return int(digits)


# ------------------------------------------------------------------------- commands
@app.command()
def push(
    adapter_dir: Annotated[Path, typer.Argument(help="peft adapter directory.")],
    name: Annotated[str, typer.Option("--name", help="tenant/name to register under.")],
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model dir (default: the registered base the adapter names).")
    ] = None,
    lineage: Annotated[Path | None, typer.Option(help="JSON file with lineage.")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Validate and register an adapter as the next version of NAME."""
    with session(registry, blob_dir, token, as_json) as s:
        meta = _read_lineage(lineage)
        v = s.reg.push(s.me, adapter_dir, name, base=base, lineage=meta)
        said = (f"registered {v.ref} {v.digest}" if v.created
                else f"{v.ref} already holds this content ({v.digest}); nothing registered")
        s.emit(version_dict(v), said)


def _read_lineage(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"--lineage {path}: {e}", field="lineage") from e


@app.command("list")
def list_(
    key: Annotated[str | None, typer.Argument(help="tenant/name: list its versions.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's adapters.")] = None,
    page_size: Annotated[int | None, typer.Option(
        help="One page of at most this many adapters (1-1000), and the token of the next "
             "page; default: every adapter.")] = None,
    page_token: Annotated[str | None, typer.Option(
        help="Start where the previous page's `next page` token says.")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """List adapters (newest version of each), or every version of KEY.

    With --page-size (or --page-token) one page: --json prints {"adapters": [...],
    "next_page_token": "..."} (null on the last page); the table's caption names the token."""
    with session(registry, blob_dir, token, as_json) as s:
        if key is not None:
            vs = s.reg.list_versions(s.me, key)
            s.emit([version_dict(v) for v in vs], _versions_table(f"versions of {key}", vs))
            return
        if page_size is not None or page_token is not None:
            size = 100 if page_size is None else page_size
            vs, nxt = s.reg.list_adapters(s.me, tenant=tenant, page_size=size,
                                          page_token=page_token)
            table = _versions_table("adapters", vs)
            table.caption = f"next page: --page-token {nxt}" if nxt else "last page"
            s.emit({"adapters": [version_dict(v) for v in vs], "next_page_token": nxt}, table)
            return
        vs, page = s.reg.list_adapters(s.me, tenant=tenant)
        while page:
            more, page = s.reg.list_adapters(s.me, tenant=tenant, page_token=page)
            vs += more
        s.emit([version_dict(v) for v in vs], _versions_table("adapters", vs))


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="t/n, t/n@alias, t/n:vN or sha256:…")],
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Show one version's manifest, the adapter's aliases and their history."""
    with session(registry, blob_dir, token, as_json) as s:
        v = s.reg.resolve(s.me, ref)
        names = s.reg.aliases(s.me, v.key)
        history = [_move_dict(m) for m in s.reg.alias_history(s.me, v.key)]
        data = version_dict(v) | {"aliases": names, "alias_history": history}
        table = Table(title=v.ref, show_header=False)
        for k in ("digest", "size_bytes", "rank", "alpha", "use_rslora", "target_modules",
                  "dtype", "created_at", "created_by"):
            table.add_row(k, str(data[k]))
        table.add_row("base", v.base.summary())
        table.add_row("lineage", json.dumps(v.lineage, sort_keys=True))
        table.add_row("aliases", ", ".join(f"{a}→v{n}" for a, n in names.items()) or "-")
        for m in history:
            table.add_row("alias move", f"{m['alias']}: {m['from']} → {m['to']} "
                          f"({m['at'][:19]} by {m['by']})")
        s.emit(data, table)


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="Version to fetch.")],
    dest: Annotated[Path, typer.Argument(help="Directory to write the peft files into.")],
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Write a version's adapter_config.json + adapter_model.safetensors (+ manifest)."""
    with session(registry, blob_dir, token, as_json) as s:
        v = s.reg.resolve(s.me, ref)
        out = s.reg.pull(s.me, v.ref, dest)
        s.emit({"ref": v.ref, "digest": v.digest, "dir": str(out)}, f"wrote {v.ref} to {out}")


@app.command()
def alias(
    ref: Annotated[str, typer.Argument(help="Version the alias should point at.")],
    name: Annotated[str, typer.Argument(help="Alias name, e.g. prod.")],
    expect: Annotated[str | None, typer.Option(
        "--expect", help="Move only if the alias points at this version now (vN), or "
        "'none' if it must not exist yet.")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Point an alias at a version (compare-and-set with --expect)."""
    with session(registry, blob_dir, token, as_json) as s:
        move = s.reg.set_alias(s.me, ref, name, expected=_parse_expect(expect))
        where = "nothing" if move.from_version is None else f"v{move.from_version}"
        s.emit(_move_dict(move) | {"key": f"{move.tenant}/{move.name}"},
               f"{move.tenant}/{move.name}@{move.alias}: {where} → v{move.to_version}")


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="Version to delete: t/n:vN or sha256:…")],
    force: Annotated[bool, typer.Option(help="Also drop aliases pointing at it.")] = False,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Delete a version (its blobs are freed by the next gc)."""
    with session(registry, blob_dir, token, as_json) as s:
        v = s.reg.delete_version(s.me, ref, force=force)
        s.emit({"deleted": v.ref, "digest": v.digest}, f"deleted {v.ref}")


@app.command()
def verify(
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Re-hash every blob; exit 1 if anything is corrupt or missing."""
    with session(registry, blob_dir, token, as_json) as s:
        problems = s.reg.verify()
        s.emit({"ok": not problems, "problems": problems},
               "\n".join(problems) if problems else "ok: every blob matches its digest")
    if problems:
        raise typer.Exit(1)


@app.command()
def gc(
    min_age: Annotated[float | None, typer.Option(
        "--min-age", help="Spare unreferenced blobs younger than this many seconds "
        "(default LORAPLEX_GC_MIN_AGE_S, 600).")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Delete blobs that no version references."""
    with session(registry, blob_dir, token, as_json) as s:
        r = s.reg.gc(min_age_s=min_age)
        s.emit({"removed": r.removed, "freed_bytes": r.freed_bytes, "kept": r.kept},
               f"removed {len(r.removed)} blobs ({_size(r.freed_bytes)}), kept {r.kept}")


@token_app.command("create")
def token_create(
    tenant: Annotated[str, typer.Argument(help="Tenant the token acts for.")],
    scope: Annotated[str, typer.Option(
        help="inference (generate, read), publish (also push, alias, delete) or admin "
        "(also manage this tenant's tokens).")] = "publish",
    admin: Annotated[bool, typer.Option(help="An admin token (all tenants).")] = False,
    ttl: Annotated[str | None, typer.Option(
        help="Expire after this long: seconds, or 90m, 12h, 30d (default: never).")] = None,
    label: Annotated[str, typer.Option(help="A note shown by `token list`.")] = "",
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create an API token; it is shown once and stored only as a hash."""
    with session(registry, blob_dir, token, as_json) as s:
        new, info = s.reg.issue_token(s.me, tenant, admin=admin,
                                        scope="admin" if admin else scope,  # type: ignore[arg-type]
                                        ttl_s=_duration(ttl), label=label)
        s.emit(info.as_dict() | {"token": new}, new)


@token_app.command("list")
def token_list(
    tenant: Annotated[str | None, typer.Argument(
        help="Tenant (default: the caller's; an admin sees every tenant's).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Include revoked and expired.")] = False,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Tokens with their scope and created / last-used / expiry times (never secrets)."""
    with session(registry, blob_dir, token, as_json) as s:
        infos = s.reg.list_tokens(s.me, tenant, include_inactive=all_)
        table = Table("id", "tenant", "scope", "label", "created", "last used", "expires",
                      "state", title="API tokens")
        for i in infos:
            table.add_row(i.id, i.tenant, i.scope, i.label, _when(i.created_at),
                          _when(i.last_used_at), _when(i.expires_at),
                          "active" if i.active() else "revoked" if i.revoked_at else "expired")
        s.emit([i.as_dict() for i in infos], table)


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok_…), from `token list`.")],
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Revoke a token now (servers stop accepting it within their token cache time)."""
    with session(registry, blob_dir, token, as_json) as s:
        info = s.reg.revoke_token(s.me, token_id)
        s.emit(info.as_dict(), f"revoked {info.id} ({info.tenant}, {info.scope})")


@token_app.command("rotate")
def token_rotate(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok_…), from `token list`.")],
    grace: Annotated[str, typer.Option(
        help="Keep the old token working this long (seconds, or 90m, 12h).")] = "0",
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """A new token with the old one's tenant, scope and label; prints the new secret."""
    with session(registry, blob_dir, token, as_json) as s:
        new, info = s.reg.rotate_token(s.me, token_id, grace_s=_duration(grace) or 0.0)
        s.emit(info.as_dict() | {"token": new, "replaces": token_id}, new)


@token_app.command("purge")
def token_purge(
    tenant: Annotated[str | None, typer.Argument(
        help="Tenant (default: the caller's; an admin's: every tenant's).")] = None,
    older_than: Annotated[str | None, typer.Option(
        help="Purge tokens inactive at least this long (seconds, or 90m, 12h, 7d; 0: every "
        "inactive one). Default: the retention, LORAPLEX_TOKEN_RETENTION_S (30 days).")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Delete revoked and expired tokens' rows (each audited as `purged`; active tokens
    are never touched). Token creation purges those past the retention by itself."""
    with session(registry, blob_dir, token, as_json) as s:
        ids = s.reg.purge_tokens(s.me, tenant, older_than_s=_duration(older_than))
        s.emit({"purged": ids}, f"purged {len(ids)} token(s)" + (
            f": {', '.join(ids)}" if ids else ""))


@token_app.command("history")
def token_history(
    tenant: Annotated[str | None, typer.Argument(help="Tenant (default: the caller's).")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """The audit log of a tenant's tokens: created, rotated, revoked; when and by whom."""
    with session(registry, blob_dir, token, as_json) as s:
        events = s.reg.token_history(s.me, tenant)
        table = Table("at", "token", "action", "detail", "by", title="token changes")
        for e in events:
            table.add_row(_when(e.at), e.token_id, e.action, e.detail, e.by)
        s.emit([e.__dict__ for e in events], table)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str | None) -> float | None:
    """Seconds from `3600`, `90m`, `12h` or `30d` (None stays None)."""
    if text is None:
        return None
    unit = _UNITS.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise InvalidArgument(f"not a duration: {quote(text)} (seconds, or e.g. 90m, 12h, "
                              "30d)", field="ttl") from None
    return value


def _when(ts: Any) -> str:
    return "-" if ts is None else ts.strftime("%Y-%m-%d %H:%M:%S")


@base_app.command("add")
def base_add(
    base_dir: Annotated[Path, typer.Argument(help="Hugging Face model directory.")],
    name: Annotated[list[str] | None, typer.Option(
        "--name", help="Extra names adapters may declare for it.")] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Register a base so adapters naming it (base_model_name_or_path) find it."""
    with session(registry, blob_dir, token, as_json) as s:
        fp = s.reg.register_base(s.me, base_dir, names=name)
        data = {k: v for k, v in fp.to_dict().items() if k != "linear_shapes"}
        s.emit(data, f"registered base {fp.summary()}")


@base_app.command("list")
def base_list(
    registry: RegistryOpt = DEFAULT_REGISTRY, blob_dir: BlobDirOpt = None,
    token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """List known bases and the names they answer to."""
    with session(registry, blob_dir, token, as_json) as s:
        rows = s.reg.list_bases()
        table = Table(title="bases")
        table.add_column("fingerprint")
        table.add_column("names")
        for names, fp in rows:
            table.add_row(fp.summary(), "\n".join(names))
        s.emit([{"names": n, "digest": fp.digest, "architecture": fp.architecture}
                for n, fp in rows], table)


# compress / merge (and the root's `export`) live in algebra_cli.py; importing it attaches them.
from loraplex.registry import algebra_cli  # noqa: E402,F401


def main() -> None:  # pragma: no cover - `python -m loraplex.registry.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
