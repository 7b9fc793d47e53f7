"""Registration checks: each rejection, all problems reported at once, nothing left visible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraplex.errors import ValidationFailed
from loraplex.registry import Identity, Registry
from tests.registry.conftest import adapter_files, sqlite_registry, write_adapter

ME = Identity.system()


def _edit_config(d: Path, **changes: object) -> Path:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _edit_tensors(d: Path, fn) -> Path:  # fn(tensors) edits in place
    from safetensors.torch import load_file

    tensors = load_file(d / "adapter_model.safetensors")
    fn(tensors)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _rejected(reg: Registry, d: Path, **kw: object) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        reg.push(ME, d, "acme/support", **kw)
    assert reg.list_adapters(ME) == ([], None), "a rejected push must leave nothing visible"
    assert list(reg.blobs.list()) == [], "validation runs before any blob is written"
    return info.value


def _add_magnitudes(t: dict[str, torch.Tensor]) -> None:
    """DoRA: a magnitude per output feature beside every pair, as peft saves it."""
    for k in [k for k in t if k.endswith(".lora_B.weight")]:
        t[k.removesuffix(".lora_B.weight") + ".lora_magnitude_vector"] = (
            torch.rand(t[k].shape[0]) + 0.5)


def _dora(d: Path) -> Path:
    return _edit_config(_edit_tensors(d, _add_magnitudes), use_dora=True)


@pytest.fixture
def reg(sqlite_reg: Registry, micro_base: Path) -> Registry:
    """A registry that knows micro_base, so adapters find it by their declared name."""
    sqlite_reg.register_base(ME, micro_base)
    return sqlite_reg


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
MAG0 = f"{Q0}.lora_magnitude_vector"


@pytest.mark.parametrize(("edit", "field", "problem"), [
    (lambda d: _edit_config(d, peft_type="IA3"), "peft_type", "must be 'LORA'"),
    (lambda d: _edit_config(d, r=0), "r", "must be an integer > 0"),
    (lambda d: _edit_config(d, r="4"), "r", "must be an integer > 0"),
    (lambda d: _edit_config(d, lora_alpha=-1), "lora_alpha", "must be a number > 0"),
    (lambda d: _edit_config(d, target_modules=[]), "target_modules", "non-empty list"),
    (lambda d: _edit_config(d, target_modules="q_proj("), "target_modules", "regular expr"),
    (lambda d: _edit_config(d, use_dora=True), "use_dora", "have no magnitude vector"),
    (lambda d: _edit_config(d, use_dora="yes"), "use_dora", "must be true or false"),
    (lambda d: _edit_tensors(d, _add_magnitudes), MAG0, "`use_dora` is not true"),
    (lambda d: _edit_tensors(_dora(d), lambda t: t.pop(MAG0)), "use_dora",
     "1 module(s) have no magnitude vector"),
    (lambda d: _edit_tensors(_dora(d), lambda t: t.__setitem__(MAG0, torch.ones(63))), MAG0,
     "expected [64] (one DoRA magnitude per output feature)"),
    (lambda d: _edit_tensors(_dora(d), lambda t: t[MAG0].__setitem__(3, math.nan)), MAG0,
     "1 NaN/Inf"),
    (lambda d: _edit_config(d, rank_pattern={"q_proj": 8}), f"{Q0}.lora_A.weight",
     "expected [8, 64]"),
    (lambda d: _edit_config(d, rank_pattern={"q_proj": 0}), "rank_pattern",
     "'q_proj': must be an integer > 0"),
    (lambda d: _edit_config(d, rank_pattern={"q_proj": 9999}), "rank_pattern",
     "exceeds the maximum"),
    (lambda d: _edit_config(d, alpha_pattern={"(": 2}), "alpha_pattern", "regular expr"),
    (lambda d: _edit_config(d, alpha_pattern=[1]), "alpha_pattern", "must be an object"),
    (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save", "extra"),
    (lambda d: _edit_config(d, bias="all"), "bias", "bias training"),
    (lambda d: _edit_config(d, target_modules=["q_proj"]),
     f"{Q0.replace('q_', 'v_')}.lora_A.weight",
     "not among target_modules"),
    (lambda d: _edit_config(d, r=8), f"{Q0}.lora_A.weight", "expected [8, 64]"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json",
     "not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x80\x04K\x01." * 4),
     "adapter_model.safetensors", "not a safetensors file"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(f"{Q0}.weight", torch.zeros(2, 2))),
     f"{Q0}.weight", "not a LoRA weight"),
    (lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")),
     "model.layers.0.self_attn.q_proj", "has no lora_B"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_B.weight", torch.zeros(63, 4))), f"{Q0}.lora_B.weight",
     "expected [64, 4]"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64))),
     "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
     "not a linear layer of the base"),
    (lambda d: _edit_tensors(d, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__(
        (0, 0), math.nan)), f"{Q0}.lora_A.weight", "1 NaN/Inf"),
    (lambda d: _edit_tensors(d, lambda t: t[f"{Q0}.lora_B.weight"].__setitem__(
        (1, 1), math.inf)), f"{Q0}.lora_B.weight", "1 NaN/Inf"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_A.weight", torch.zeros(4, 64, dtype=torch.int32))), f"{Q0}.lora_A.weight",
     "not a float type"),
    (lambda d: _edit_tensors(d, lambda t: t.__setitem__(
        f"{Q0}.lora_A.weight", t[f"{Q0}.lora_A.weight"].half())), "adapter_model.safetensors",
     "mixes dtypes"),
    (lambda d: (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle"), "files",
     "pickle weight files are refused (adapter_model.bin)"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "files",
     "adapter_model.safetensors is missing"),
])
def test_each_rejection_names_its_field(reg: Registry, make_adapter, edit, field: str,
                                        problem: str) -> None:
    d = make_adapter()
    edit(d)
    err = _rejected(reg, d)
    matching = [v for v in err.violations if v.startswith(field + ":") and problem in v]
    assert matching, err.violations
    assert err.code == "INVALID_ARGUMENT"


def test_a_dora_adapter_is_registered_with_its_magnitudes(reg: Registry, make_adapter) -> None:
    v = reg.push(ME, _dora(make_adapter()), "acme/support")
    loaded = reg.load_adapter(v)
    mags = {k for k in loaded.tensors if k.endswith(".lora_magnitude_vector")}
    assert loaded.config["use_dora"] is True
    assert f"{MAG0.removeprefix('base_model.model.')}" in mags
    assert len(mags) == len(loaded.pairs())  # one per module, none dropped
    plain = reg.push(ME, make_adapter(), "acme/plain")
    assert plain.digest != v.digest


def test_rank_above_the_configured_maximum(tmp_path: Path, make_adapter,
                                           micro_base: Path) -> None:
    with sqlite_registry(tmp_path, max_rank=2) as reg:
        err = _rejected(reg, make_adapter(r=4), base=micro_base)
    assert err.violations == ["r: rank 4 exceeds the maximum 2 (LORAPLEX_MAX_RANK)"]
    assert err.field == "r"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.registry import RegistrySettings

    monkeypatch.setenv("LORAPLEX_MAX_RANK", "3")
    monkeypatch.setenv("LORAPLEX_MAX_ADAPTER_BYTES", "1000")
    s = RegistrySettings()
    assert (s.max_rank, s.max_adapter_bytes) == (3, 1000)


def test_size_cap(tmp_path: Path, make_adapter, micro_base: Path) -> None:
    with sqlite_registry(tmp_path, max_adapter_bytes=1000) as reg:
        err = _rejected(reg, make_adapter(), base=micro_base)
    assert len(err.violations) == 1 and err.violations[0].startswith("size_bytes: ")
    assert "exceeds the cap of 1000" in err.violations[0]


def test_every_violation_is_reported_at_once(reg: Registry, make_adapter) -> None:
    d = make_adapter()
    _edit_config(d, peft_type="X", use_dora=True, lora_alpha=0)
    _edit_tensors(d, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__((0, 0), math.nan))
    (d / "adapter_model.pt").write_bytes(b"pickle")
    (d / "training_args.bin").write_bytes(b"pickle")  # not adapter weights: ignored
    err = _rejected(reg, d)
    assert "training_args" not in str(err)
    fields = {v.split(":", 1)[0] for v in err.violations}
    assert {"files", "peft_type", "use_dora", "lora_alpha", f"{Q0}.lora_A.weight"} <= fields
    assert err.field == "files"  # the first problem found


def test_unknown_base_is_refused(sqlite_reg: Registry, make_adapter) -> None:
    err = _rejected(sqlite_reg, make_adapter(base_name="nobody/knows-this-model"))
    assert err.field == "base"
    assert "no registered base is named 'nobody/knows-this-model'" in err.violations[0]


def test_base_must_match_the_declared_registered_base(sqlite_reg: Registry, make_adapter,
                                                      base_factory, micro_base: Path) -> None:
    sqlite_reg.register_base(ME, micro_base)
    other = base_factory("micro", "qwen2")  # same shapes for q/v, different weights
    err = _rejected(sqlite_reg, make_adapter(), base=other)
    assert any(v.startswith("base: the adapter declares base") for v in err.violations)


def test_lineage_base_digest_must_match(sqlite_reg: Registry, make_adapter,
                                        micro_base: Path) -> None:
    for lineage in ({"base_digest": "sha256:" + "0" * 64},
                    {"base": {"digest": "sha256:" + "0" * 64}}):  # the trainer's layout
        err = _rejected(sqlite_reg, make_adapter(), base=micro_base, lineage=lineage)
        assert any("lineage records base" in v for v in err.violations)


def test_registered_base_is_found_by_declared_name(sqlite_reg: Registry, make_adapter,
                                                    micro_base: Path) -> None:
    sqlite_reg.register_base(ME, micro_base)
    v = sqlite_reg.push(ME, make_adapter(), "acme/support")
    assert v.base.digest == sqlite_reg.list_bases()[0][1].digest


def test_fingerprint_without_shapes_uses_the_registered_one(sqlite_reg: Registry, make_adapter,
                                                             micro_base: Path, micro_fp) -> None:
    from loraplex.fingerprint import BaseFingerprint

    bare = BaseFingerprint.from_dict({**micro_fp.to_dict(), "linear_shapes": {}})
    err = _rejected(sqlite_reg, make_adapter(), base=bare)
    assert err.field == "base"
    sqlite_reg.register_base(ME, micro_base)
    assert sqlite_reg.push(ME, make_adapter(), "acme/support", base=bare).version == 1


def test_accepted_variants(sqlite_reg: Registry, make_adapter, micro_fp,
                           micro_base: Path, tmp_path: Path) -> None:
    """bf16, rsLoRA, regex targets and keys without peft's prefix are all fine; the
    prefix-less upload is stored in peft's layout under the same digest."""
    with_prefix = sqlite_reg.push(ME, make_adapter(seed=1), "acme/a", base=micro_base)
    without = sqlite_reg.push(ME, make_adapter(seed=1, prefix=False), "acme/b",
                              base=micro_base)
    assert without.digest == with_prefix.digest
    assert all(k.startswith("model.layers.") for k in sqlite_reg.load_adapter(without).tensors)
    pulled = sqlite_reg.pull(ME, "acme/b", tmp_path / "pulled")
    from safetensors import safe_open

    with safe_open(str(pulled / "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model.") for k in f.keys())
    bf16 = sqlite_reg.push(ME, make_adapter(dtype=torch.bfloat16), "acme/c", base=micro_base)
    assert bf16.dtype == "bfloat16"
    rs = sqlite_reg.push(ME, make_adapter(config={"use_rslora": True}, r=4, alpha=8),
                         "acme/d", base=micro_base)
    assert rs.use_rslora and rs.scale == pytest.approx(8 / 2)
    cfg, tensors = adapter_files(micro_fp.linear_shapes, targets=("q_proj", "v_proj"),
                                 base_name=str(micro_base),
                                 config={"target_modules": r".*\.(q_proj|v_proj)"})
    regex = sqlite_reg.push(ME, write_adapter(tmp_path / "rx", cfg, tensors), "acme/e",
                           base=micro_base)
    assert regex.target_modules == ("q_proj", "v_proj")
