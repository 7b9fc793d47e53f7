"""`loraplex registry …` end to end through typer's CliRunner, as a user would type it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.registry.cli import app


@pytest.fixture
def cli(tmp_path: Path):
    """cli(*args, ok=True) -> (exit code, stdout); `--registry` comes from the env."""
    runner = CliRunner()
    env = {"LORAPLEX_REGISTRY": str(tmp_path / "reg"), "LORAPLEX_TOKEN": None,
           "LORAPLEX_BLOB_DIR": None}

    def run(*args: str, ok: bool = True) -> tuple[int, str, str]:
        result = runner.invoke(app, [str(a) for a in args], env=env)
        if ok and result.exit_code != 0:
            raise AssertionError(f"{args} failed ({result.exit_code}): {result.output}"
                                 f"{result.stderr} {result.exception!r}")
        return result.exit_code, result.stdout, result.stderr

    return run


def _json(out: str):
    return json.loads(out)


def test_round_trip(cli, make_adapter, micro_base: Path, tmp_path: Path) -> None:
    d1, d2 = make_adapter(seed=1), make_adapter(seed=2)
    cli("base", "add", micro_base)
    pushed = _json(cli("push", d1, "--name", "acme/support", "--json")[1])
    assert pushed["ref"] == "acme/support:v1" and pushed["created"] is True
    assert _json(cli("push", d1, "--name", "acme/support", "--json")[1])["created"] is False
    lineage = tmp_path / "lineage.json"
    lineage.write_text(json.dumps({"seed": 5}))
    _, out, _ = cli("push", d2, "--name", "acme/support", "--base", micro_base,
                    "--lineage", lineage)
    assert "registered acme/support:v2" in out

    listed = _json(cli("list", "--json")[1])
    assert [v["ref"] for v in listed] == ["acme/support:v2"]
    versions = _json(cli("list", "acme/support", "--json")[1])
    assert [v["version"] for v in versions] == [1, 2] and versions[1]["lineage"] == {"seed": 5}
    assert "acme/support:v2" in cli("list")[1]  # the human table

    cli("alias", "acme/support:v1", "prod", "--expect", "none")
    code, out, _ = cli("alias", "acme/support:v2", "prod", "--expect", "v2", "--json", ok=False)
    assert code == 1 and _json(out)["error"]["code"] == "FAILED_PRECONDITION"
    cli("alias", "acme/support:v2", "prod", "--expect", "v1")
    shown = _json(cli("show", "acme/support@prod", "--json")[1])
    assert shown["version"] == 2 and shown["aliases"] == {"prod": 2}
    assert [(m["from"], m["to"]) for m in shown["alias_history"]] == [(None, 1), (1, 2)]
    assert "alias move" in cli("show", "acme/support@prod")[1]

    cli("pull", "acme/support@prod", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (d2 / "adapter_model.safetensors").read_bytes()
    manifest = json.loads((tmp_path / "out" / "loraplex_manifest.json").read_text())
    assert manifest["ref"] == "acme/support:v2"

    code, _, err = cli("rm", "acme/support:v2", ok=False)
    assert code == 1 and "target of alias prod" in err
    cli("rm", "acme/support:v2", "--force")
    assert _json(cli("verify", "--json")[1]) == {"ok": True, "problems": []}
    gc = _json(cli("gc", "--min-age", "0", "--json")[1])
    assert len(gc["removed"]) == 1 and gc["freed_bytes"] > 0  # v2's weights; config shared


def test_tokens_and_tenant_scoping(cli, make_adapter, micro_base: Path) -> None:
    cli("push", make_adapter(seed=1), "--name", "acme/support", "--base", micro_base)
    cli("push", make_adapter(seed=2), "--name", "globex/support", "--base", micro_base)
    token = _json(cli("token", "create", "acme", "--json")[1])["token"]
    mine = _json(cli("list", "--json", "--token", token)[1])
    assert [v["ref"] for v in mine] == ["acme/support:v1"]
    code, out, _ = cli("show", "globex/support", "--token", token, "--json", ok=False)
    assert code == 1 and _json(out)["error"] == {
        "code": "NOT_FOUND", "message": "adapter globex/support not found", "field": "ref",
        "violations": []}
    code, _, err = cli("list", "--token", "lpx_forged", ok=False)
    assert code == 1 and "UNAUTHENTICATED" in err
    code, _, err = cli("token", "create", "acme", "--admin", "--token", token, ok=False)
    assert code == 1 and "PERMISSION_DENIED" in err


def test_rejections_list_every_violation(cli, make_adapter, micro_base: Path) -> None:
    d = make_adapter()
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps(cfg | {"r": 0, "peft_type": "X"}))
    code, _, err = cli("push", d, "--name", "acme/support", "--base", micro_base, ok=False)
    assert code == 1
    assert "adapter rejected" in err and "  - peft_type:" in err and "  - r:" in err
    code, out, _ = cli("push", d, "--name", "Acme/x", "--json", ok=False)
    assert _json(out)["error"]["field"] == "name"
    code, _, err = cli("alias", "acme/x:v1", "prod", "--expect", "seven", ok=False)
    assert code == 1 and "--expect 'seven'" in err


def test_list_pages(cli, make_adapter, micro_base: Path) -> None:
    cli("base", "add", micro_base)
    for i, name in enumerate(("acme/a", "acme/b", "acme/c")):
        cli("push", make_adapter(seed=i), "--name", name)
    first = _json(cli("list", "--page-size", "2", "--json")[1])
    assert [v["ref"] for v in first["adapters"]] == ["acme/a:v1", "acme/b:v1"]
    rest = _json(cli("list", "--page-token", first["next_page_token"], "--json")[1])
    assert [v["ref"] for v in rest["adapters"]] == ["acme/c:v1"]
    assert rest["next_page_token"] is None
    assert f"--page-token {first['next_page_token']}" in cli("list", "--page-size", "2")[1]
    code, out, _ = cli("list", "--page-size", "0", "--json", ok=False)
    assert code == 1 and _json(out)["error"]["field"] == "page_size"
