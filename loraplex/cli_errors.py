"""How a typed error looks on the command line, decided in one place.

Every `LoraplexError` raised by any sub-command (registry, trainer, runtime, base) ends as
one line on stderr and exit status 1:

    error: FAILED_PRECONDITION: writing blob into /srv/reg/blobs/sha256/ab: Read-only file system: …

(a `ValidationFailed` lists its violations under that line, one per line). Commands that
take `--json` mark the context (`json_errors`, the option's callback), and then the error is also printed to stdout as JSON for
scripts. `--debug` on the root command or `LORAPLEX_DEBUG=1` re-raises instead, so the
traceback shows. Anything that is not a `LoraplexError` is a bug and keeps its traceback.

The handler is a click group class (`ErrorHandlingGroup`), given to the root Typer and to
sub-apps that are also run on their own (`python -m loraplex.registry.cli`), so no command
needs its own try/except.
"""

from __future__ import annotations

import json
import os
from typing import Any

import typer
from typer.core import TyperGroup

from loraplex.errors import LoraplexError, ValidationFailed

JSON_ERRORS = "loraplex.json_errors"  # ctx.meta key: the running command prints JSON


def format_error(e: LoraplexError) -> str:
    """`error: CODE: message (field f)`; violations of a rejected adapter below it."""
    where = f" (field {e.field})" if e.field else ""
    if isinstance(e, ValidationFailed) and e.violations:
        return "\n".join([f"error: {e.code}: adapter rejected{where}:",
                          *(f"  - {v}" for v in e.violations)])
    return f"error: {e.code}: {e.message}{where}"


def error_json(e: LoraplexError) -> dict[str, Any]:
    violations = e.violations if isinstance(e, ValidationFailed) else []
    return {"error": {"code": e.code, "message": e.message, "field": e.field,
                      "violations": violations}}


def json_errors(ctx: typer.Context, as_json: bool) -> bool:
    """Callback of a `--json` option: that command's errors go to stdout as JSON too.
    (`ctx.meta` is shared by a context and all its parents, so the group sees it.)"""
    ctx.meta[JSON_ERRORS] = as_json
    return as_json


def debug_enabled(ctx: typer.Context) -> bool:
    if os.environ.get("LORAPLEX_DEBUG", "") not in ("", "0", "false", "no"):
        return True
    return bool(ctx.find_root().params.get("debug"))


class ErrorHandlingGroup(TyperGroup):
    """A typer group that prints a typed error as one line and exits 1."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoraplexError as e:
            if debug_enabled(ctx):
                raise
            if ctx.meta.get(JSON_ERRORS):
                typer.echo(json.dumps(error_json(e)))
            typer.echo(format_error(e), err=True)
            raise typer.Exit(1) from None
