"""The `loraplex` command line.

    loraplex base build ./base --size tiny
    loraplex base import smollm2-135m-instruct ./smollm2
    loraplex registry push ./adapter --name acme/support --base ./base
    loraplex train --base ./base --data acme.jsonl --name acme/support
    loraplex serve --base ./base

Sub-commands of each package live beside that package (`registry/cli.py`, …) and are
attached here, so this module stays a table of contents.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import typer

from loraplex.cli_errors import ErrorHandlingGroup

# bitsandbytes' CPU backend tries to fetch an optional kernel from a model hub at import and
# warns when it can't; nothing is downloaded at run time here, so the warning is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

app = typer.Typer(help="loraplex: LoRA adapter registry and multi-tenant serving runtime.",
                  no_args_is_help=True, pretty_exceptions_enable=False,
                  cls=ErrorHandlingGroup)  # every typed error: one line, exit 1
base_app = typer.Typer(help="Base models: build the embedded one, import a real one.",
                       no_args_is_help=True)
app.add_typer(base_app, name="base")


@app.callback()
def _root(debug: bool = typer.Option(
        False, "--debug", envvar="LORAPLEX_DEBUG",
        help="Show the traceback of an error instead of one line.")) -> None:
    """loraplex: LoRA adapter registry and multi-tenant serving runtime."""


@base_app.command("build")
def base_build(
    out_dir: Path = typer.Argument(..., help="Directory to write the model into."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical weights."),
    size: str = typer.Option("tiny", help="micro | tiny | bench"),
    arch: str = typer.Option("llama", help="llama | qwen2 | gpt2"),
    pretrain: bool = typer.Option(True, help="Briefly pre-train (tiny/micro) so LoRA learns fast."),
) -> None:
    """Build the embedded base model as a Hugging Face directory."""
    from loraplex.basemodel import build_base
    from loraplex.fingerprint import fingerprint_base
    from loraplex.trainer.pretrain import default_pretrain

    fn = default_pretrain(size) if pretrain else None
    build_base(out_dir, size=size, arch=arch, seed=seed, pretrain=fn)
    fp = fingerprint_base(out_dir)
    typer.echo(json.dumps({"dir": str(out_dir), "fingerprint": fp.summary(),
                           "digest": fp.digest}))


@base_app.command("import")
def base_import(
    src: str = typer.Argument(..., help="smollm2-135m-instruct | a .gguf file | an HF model "
                                        "directory | a hub id (where a hub is reachable)"),
    dest: Path = typer.Argument(..., help="Directory to write the base into."),
    dtype: str = typer.Option("auto", help="auto (float32 for GGUF, the source's own for HF) "
                                           "| float32 | bfloat16 | float16"),
    overwrite: bool = typer.Option(False, help="Replace DEST if it is not empty."),
) -> None:
    """Import a real model as a base directory (weights, tokenizer, chat template,
    generation config with end-of-turn tokens, fingerprint)."""
    from loraplex.base_import import import_base
    from loraplex.errors import LoraplexError

    try:
        res = import_base(src, dest, dtype=dtype, overwrite=overwrite)
    except LoraplexError as e:
        typer.echo(f"error [{e.code}]: {e.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"dir": str(res.dest), "source": res.source.kind,
                           "fingerprint": res.fingerprint.summary(),
                           "digest": res.fingerprint.digest,
                           "eos_token_ids": res.eos_token_ids, "seconds": round(res.seconds, 1)}))


# Package CLIs: (module, attribute, mount name or None for top-level commands).
_PLUGINS = [
    ("loraplex.registry.cli", "app", "registry"),
    ("loraplex.registry.algebra_cli", "register", None),  # `loraplex export`
    ("loraplex.trainer.cli", "register", None),
    ("loraplex.runtime.cli", "register", None),
]


def _attach_plugins() -> None:
    """Every package CLI is part of the product: one that cannot be imported is a bug."""
    for module, attr, name in _PLUGINS:
        obj = getattr(importlib.import_module(module), attr)
        if name is not None:
            app.add_typer(obj, name=name)
        else:
            obj(app)


_attach_plugins()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
