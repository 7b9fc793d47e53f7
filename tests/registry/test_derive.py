"""Compress and merge as registry verbs: new versions, lineage, tenancy, the CLI and its gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.errors import NotFound
from loraplex.registry import Identity, Registry
from loraplex.registry.algebra import modules_of
from loraplex.registry.derive import compress_version, merge_versions

ACME = Identity("acme")
ADMIN = Identity.system()


@pytest.fixture
def world(tmp_path: Path, make_adapter, micro_base: Path):
    reg = Registry.open(tmp_path / "reg")
    reg.register_base(ADMIN, micro_base)
    vs = {
        "acme/a": reg.push(ADMIN, make_adapter(seed=1, r=8), "acme/a"),
        "acme/b": reg.push(ADMIN, make_adapter(seed=2, r=8, alpha=4), "acme/b"),
        "globex/g": reg.push(ADMIN, make_adapter(seed=3, r=8), "globex/g"),
    }
    yield reg, vs
    reg.close()


def _deltas(reg: Registry, v) -> dict[str, torch.Tensor]:
    loaded = reg.load_adapter(v)
    return {p: m.scale * m.b.double() @ m.a.double()
            for p, m in modules_of(loaded.config, loaded.tensors).items()}


def test_compress_is_a_new_version_with_lineage_that_peft_opens(world, micro_base, tmp_path):
    reg, vs = world
    src = vs["acme/a"]
    v = compress_version(reg, ACME, "acme/a", energy=0.8, scope="global")
    assert v.ref == "acme/a:v2" and v.created and v.base.digest == src.base.digest
    lin = v.lineage
    assert lin["operation"] == "compress" and lin["source"]["digest"] == src.digest
    assert lin["parameters"] == {"energy": 0.8, "scope": "global"}
    assert lin["energy_kept"] >= 0.8 and set(lin["modules"]) == set(_deltas(reg, src))
    assert v.size_bytes < src.size_bytes
    # peft reads rank_pattern/alpha_pattern so that its ΔW is exactly our truncated one
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(micro_base),
                                      reg.pull(ACME, v.ref, tmp_path / "c"))
    ours = _deltas(reg, v)
    for path, delta in ours.items():
        layer = model.base_model.model.get_submodule(path)
        assert layer.r["default"] == lin["modules"][path]["rank"]
        assert torch.allclose(layer.get_delta_weight("default").double(), delta, atol=1e-5)
    # same content again: the same version, nothing new
    assert not compress_version(reg, ACME, "acme/a:v1", energy=0.8, scope="global").created


def test_full_rank_compression_keeps_the_adapter_and_names_default_to_the_source(world):
    reg, vs = world
    v = compress_version(reg, ACME, "acme/b", rank=8, name="acme/b-small")
    assert v.ref == "acme/b-small:v1" and v.lineage["modules"]
    before, after = _deltas(reg, vs["acme/b"]), _deltas(reg, v)
    for p in before:
        assert torch.allclose(before[p], after[p], atol=1e-4)


def test_merge_lineage_lists_every_input(world):
    reg, vs = world
    m = merge_versions(reg, ACME, ["acme/a", "acme/b:v1"], name="acme/ab", method="ties",
                       weights=[0.5, 1.5], density=0.4)
    assert m.ref == "acme/ab:v1"
    assert m.lineage["method"] == "ties"
    assert m.lineage["parameters"] == {"weights": [0.5, 1.5], "density": 0.4}
    assert [(i["ref"], i["digest"], i["weight"]) for i in m.lineage["inputs"]] == [
        ("acme/a:v1", vs["acme/a"].digest, 0.5), ("acme/b:v1", vs["acme/b"].digest, 1.5)]


def test_cross_tenant_inputs_are_refused_as_not_found(world):
    reg, _ = world
    with pytest.raises(NotFound) as missing:
        compress_version(reg, ACME, "acme/nope", rank=2)
    with pytest.raises(NotFound) as foreign:
        compress_version(reg, ACME, "globex/g", rank=2)
    assert foreign.value.code == missing.value.code == "NOT_FOUND"
    assert str(foreign.value).replace("globex/g", "X") == str(missing.value).replace(
        "acme/nope", "X")
    for who in (ACME, ADMIN):  # an admin can read both, but not merge across tenants
        with pytest.raises(NotFound, match="globex/g not found"):
            merge_versions(reg, who, ["acme/a", "globex/g"], name="acme/mix")
    with pytest.raises(NotFound):  # nor publish acme's adapter under globex's name
        compress_version(reg, ADMIN, "acme/a", rank=2, name="globex/stolen")
    assert reg.list_adapters(ADMIN, tenant="globex")[0][0].key == "globex/g"


# ------------------------------------------------------------------------ CLI and gate
@pytest.fixture
def cli(world, tmp_path: Path):
    runner = CliRunner()
    env = {"LORAPLEX_REGISTRY": str(tmp_path / "reg"), "LORAPLEX_TOKEN": None,
           "LORAPLEX_BLOB_DIR": None}

    def run(*args, code: int = 0):
        res = runner.invoke(app, ["registry", *(str(a) for a in args)], env=env)
        assert res.exit_code == code, f"{args}: {res.output} {res.stderr} {res.exception!r}"
        return res.stdout, res.stderr

    return run


@pytest.fixture
def gate_data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"say {w}", "completion": w} for w in ("red", "blue", "green", "tea")]
    p = tmp_path / "gate.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_cli_compress_and_merge(cli, world):
    reg, _ = world
    out, _ = cli("compress", "acme/a", "--rank", "2", "--json")
    assert json.loads(out)["ref"] == "acme/a:v2" and json.loads(out)["rank"] == 2
    out, _ = cli("merge", "acme/a:v1", "acme/b", "--method", "svd", "--svd-rank", "3",
                 "--weights", "1,-0.5", "--name", "acme/ab", "--json")
    got = json.loads(out)
    assert got["rank"] == 3 and got["lineage"]["parameters"]["weights"] == [1.0, -0.5]
    _, err = cli("merge", "acme/a", "acme/b", "--method", "nope", "--name", "acme/x", code=1)
    assert "INVALID_ARGUMENT" in err and "method" in err


def test_gate_pass_moves_the_alias(cli, world, gate_data):
    reg, _ = world
    # full rank: the same adapter re-factored, so its loss equals the source's
    out, err = cli("compress", "acme/a", "--rank", "8", "--alias", "prod",
                   "--gate", "loss<=1.001*source", "--gate-data", gate_data, "--json")
    got = json.loads(out)
    assert got["promoted"] and got["gate"]["passed"]
    assert got["gate"]["sources"]["acme/a:v1"]["loss"] == pytest.approx(
        got["gate"]["new"]["loss"], rel=1e-4)
    assert reg.resolve(ACME, "acme/a@prod").version == 2
    (kept,) = reg.evaluations(ACME, "acme/a")  # the verdict, kept beside v2
    assert (kept.version, kept.kind, kept.detail["passed"]) == (2, "gate", True)
    assert kept.metrics == pytest.approx(got["gate"]["new"])
    assert kept.detail["reason"] == got["gate"]["reason"]


def test_gate_failure_leaves_the_version_unpromoted_and_says_why(cli, world, gate_data):
    reg, _ = world
    out, err = cli("compress", "acme/a", "--rank", "1", "--alias", "prod",
                   "--gate", "exact_match>=0.9", "--gate-data", gate_data, code=1)
    assert "registered acme/a:v2" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gate failed: acme/a:v2: exact_match=0")
    assert "prod not moved" in lines[0]
    assert reg.resolve(ACME, "acme/a:v2").lineage["parameters"] == {"rank": 1}
    assert [e.detail["passed"] for e in reg.evaluations(ACME, "acme/a")] == [False]
    with pytest.raises(NotFound):
        reg.resolve(ACME, "acme/a@prod")
    # a relative gate against an impossible factor fails too, on the same numbers
    _, err = cli("merge", "acme/a:v1", "--name", "acme/same", "--alias", "prod",
                 "--gate", "loss<=0.5*source", "--gate-data", gate_data, code=1)
    assert "fails loss<=0.5*" in err and "of acme/a:v1" in err


def test_gate_without_the_trainer_is_refused_before_any_work(cli, world, gate_data,
                                                             monkeypatch):
    """`python -m loraplex.registry.cli` has no trainer to score with: a clear error, and
    nothing registered."""
    from loraplex.registry import algebra_cli

    reg, _ = world
    monkeypatch.setattr(algebra_cli, "_gate_runner", None)
    _, err = cli("compress", "acme/a", "--rank", "1", "--gate", "exact_match>=0.9",
                 "--gate-data", gate_data, code=1)
    assert "FAILED_PRECONDITION" in err and "trainer" in err
    assert [v.version for v in reg.list_versions(ACME, "acme/a")] == [1]


# ------------------------------------------------------------------------ DoRA
def _dora_adapter(make_adapter) -> Path:
    from safetensors.torch import load_file, save_file

    d = make_adapter(seed=4, r=4)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    t = load_file(d / "adapter_model.safetensors")
    for k in [k for k in t if k.endswith(".lora_B.weight")]:
        t[k.removesuffix(".lora_B.weight") + ".lora_magnitude_vector"] = torch.ones(
            t[k].shape[0])
    save_file(t, str(d / "adapter_model.safetensors"))
    return d


def test_compress_merge_and_export_refuse_dora_rather_than_drop_its_magnitude(
        world, make_adapter, cli, tmp_path):
    """B·A alone is not a DoRA adapter: every verb that would rebuild it from B·A refuses,
    by name, and publishes nothing."""
    from loraplex.errors import FailedPrecondition
    from loraplex.registry.export import export_merged

    reg, _ = world
    reg.push(ADMIN, _dora_adapter(make_adapter), "acme/d")
    with pytest.raises(FailedPrecondition, match="DoRA") as info:
        compress_version(reg, ACME, "acme/d", rank=2)
    assert info.value.field == "use_dora"
    with pytest.raises(FailedPrecondition, match="magnitude"):
        merge_versions(reg, ACME, ["acme/a", "acme/d"], name="acme/ad")
    with pytest.raises(FailedPrecondition, match="DoRA"):
        export_merged(reg, ACME, "acme/d", tmp_path / "merged")
    _, err = cli("compress", "acme/d", "--rank", "2", code=1)
    assert "FAILED_PRECONDITION" in err and "DoRA" in err
    assert [v.ref for v in reg.list_versions(ACME, "acme/d")] == ["acme/d:v1"]
    assert not _exists(reg, "acme/ad")


def _exists(reg: Registry, key: str) -> bool:
    try:
        return bool(reg.list_versions(ACME, key))
    except NotFound:
        return False
