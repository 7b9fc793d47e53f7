"""Regex denial of service: uploaded patterns are matched by RE2 in linear time.

`(a|a)*b` against 30+ `a`s takes Python's backtracking `re` about 2^30 steps (minutes;
the event loop and the engine thread stall for every tenant). Each door a tenant's
pattern reaches is tried: target_modules, exclude_modules, rank_pattern / alpha_pattern
keys, layers_pattern; through peft_format directly and through a real registry push.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import save_file

from loraplex import peft_format as pf
from loraplex.errors import InvalidArgument, ValidationFailed
from loraplex.limits import MAX_MODULE_CHARS, MAX_PATTERN_CHARS
from loraplex.registry import Identity
from tests.registry.conftest import adapter_files

EVIL = "(a|a)*b"
VICTIM = "a" * 40  # 2^40 backtracking steps under `re`; microseconds under RE2
ADMIN = Identity.system()


def _quick(fn, limit_s: float = 0.5):
    t0 = time.perf_counter()
    out = fn()
    took = time.perf_counter() - t0
    assert took < limit_s, f"took {took:.2f} s"
    return out


@pytest.mark.timeout(30)
def test_target_modules_regex_matches_in_linear_time():
    targets = pf.parse_targets(EVIL)
    assert _quick(lambda: targets.matches(VICTIM)) is False
    assert targets.matches("a" * 30 + "b") is True  # still peft's fullmatch


@pytest.mark.timeout(30)
def test_exclude_modules_regex_matches_in_linear_time():
    targets = pf.parse_targets(["q_proj"], exclude_modules=EVIL)
    assert _quick(lambda: targets.matches(VICTIM)) is False
    assert targets.matches(f"{VICTIM}.q_proj") is True


@pytest.mark.timeout(30)
def test_rank_and_alpha_pattern_keys_match_in_linear_time():
    scaling = pf.LoraScaling(8, 16, rank_pattern={EVIL: 4}, alpha_pattern={EVIL: 2})
    assert _quick(lambda: scaling.scale(VICTIM)) == 2.0  # no key matched: alpha / r
    assert scaling.rank("x." + "a" * 30 + "b") == 4  # peft's (.*\.)?(key)$ rule


@pytest.mark.timeout(30)
def test_layers_pattern_is_a_regex_matched_in_linear_time():
    targets = pf.parse_targets(["q_proj"], layers_to_transform=[0], layers_pattern=EVIL)
    module = f"{VICTIM}.0.q_proj"
    assert _quick(lambda: targets.matches(module)) is False
    assert targets.matches("model.aab.0.q_proj") is True  # unescaped, as peft puts it


@pytest.mark.parametrize(("kw", "field"), [
    ({"target_modules": r"(a)\1"}, "target_modules"),  # a backreference: not RE2
    ({"target_modules": ["q"], "exclude_modules": r"(?=a)a"}, "exclude_modules"),
    ({"target_modules": "a" * (MAX_PATTERN_CHARS + 1)}, "target_modules"),
    ({"target_modules": ["q"], "layers_pattern": "(?<=x)y"}, "layers_pattern"),
])
def test_patterns_re2_cannot_run_or_too_long_are_refused_naming_the_field(kw, field):
    with pytest.raises(InvalidArgument) as e:
        pf.parse_targets(kw.pop("target_modules"), **kw)
    assert e.value.field == field


def test_module_paths_longer_than_the_cap_are_refused():
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_MODULE_CHARS}"):
        pf.parse_targets(".*").matches("a" * (MAX_MODULE_CHARS + 1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["target_modules", "exclude_modules", "rank_pattern"])
def test_push_with_a_pathological_pattern_answers_at_once(
        sqlite_reg, micro_fp, micro_base: Path, tmp_path: Path, where: str):
    """The whole registration of an adapter whose own tensor names are the victim."""
    cfg, tensors = adapter_files(micro_fp.linear_shapes, base_name=str(micro_base))
    a, b = next(iter(tensors.values())), list(tensors.values())[1]
    tensors = {f"base_model.model.{VICTIM}.lora_A.weight": a.clone(),
               f"base_model.model.{VICTIM}.lora_B.weight": b.clone()}
    cfg.update({"target_modules": [VICTIM]} | (
        {"target_modules": EVIL} if where == "target_modules" else
        {"exclude_modules": EVIL} if where == "exclude_modules" else
        {"rank_pattern": {EVIL: 2}}))
    d = tmp_path / "evil"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(ValidationFailed) as e:  # the module is no layer of the base
        _quick(lambda: sqlite_reg.push(ADMIN, d, "acme/evil"), limit_s=5.0)
    assert "not a linear layer" in str(e.value) or "not among" in str(e.value)


def test_push_refuses_a_backreference_pattern_with_a_violation_line(
        sqlite_reg, make_adapter):
    d = make_adapter(config={"rank_pattern": {r"(q)\1": 2}})
    with pytest.raises(ValidationFailed) as e:
        sqlite_reg.push(ADMIN, d, "acme/backref")
    assert any(v.startswith("rank_pattern:") and "RE2" in v for v in e.value.violations)
