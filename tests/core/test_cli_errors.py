"""Every sub-command's typed error is one `error: CODE: …` line on stderr and exit 1.

One handler (`loraplex/cli_errors.py`) serves the registry, trainer, runtime and base
commands; `--debug` or `LORAPLEX_DEBUG=1` lets the traceback through instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.errors import LoraplexError, NotFound


def _run(args: list[str], **env: str | None):
    return CliRunner().invoke(app, [str(a) for a in args],
                              env={"LORAPLEX_DEBUG": None, "LORAPLEX_TOKEN": None} | env)


@pytest.mark.parametrize("args,code,says", [
    (["registry", "show", "acme/nope", "--registry", "{tmp}/reg"], "NOT_FOUND",
     "adapter acme/nope not found"),
    (["train", "--config", "{tmp}/missing.yaml"], "INVALID_ARGUMENT", "missing.yaml"),
    (["generate", "hi", "--target", "127.0.0.1:1", "--timeout", "2"], "UNAVAILABLE",
     "127.0.0.1:1"),
    (["base", "build", "{tmp}/b", "--size", "huge"], "INVALID_ARGUMENT", "unknown size"),
    (["serve", "--base", "{tmp}/nobase"], "INVALID_ARGUMENT", "not a model directory"),
], ids=["registry", "trainer", "runtime-generate", "base", "runtime-serve"])
def test_one_line_and_exit_1_for_every_sub_app(args, code, says, tmp_path: Path):
    result = _run([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 1, (result.output, result.exception)
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {code}: ") and says in line
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path: Path):
    args = ["registry", "show", "acme/nope", "--registry", tmp_path / "reg"]
    for result in (_run(["--debug", *args]), _run(args, LORAPLEX_DEBUG="1")):
        assert result.exit_code == 1 and isinstance(result.exception, NotFound)
        assert isinstance(result.exception, LoraplexError) and result.stderr == ""
