import pytest

from loraplex.errors import InvalidArgument
from loraplex.trainer.config import build_config


def test_flags_win_over_yaml_and_yaml_over_defaults(tmp_path):
    y = tmp_path / "train.yaml"
    y.write_text("base: ./b\ndata: d.jsonl\nname: acme/x\nlr: 0.01\nr: 4\nmax-seq-len: 64\n"
                 "target_modules: q_proj,v_proj\n")
    cfg = build_config({"lr": 0.5, "r": None, "quantization": None}, y)
    assert cfg.lr == 0.5  # flag
    assert cfg.r == 4 and cfg.max_seq_len == 64  # YAML (a None flag is "not given")
    assert cfg.quantization == "nf4"  # default
    assert cfg.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("over, field", [
    ({"quantization": "fp8"}, "quantization"),
    ({"r": 0}, "r"),
    ({"name": "Acme"}, "name"),
    ({"bogus": 1}, "bogus"),
])
def test_invalid_values_are_typed_errors_naming_the_field(over, field):
    flags = {"base": "b", "data": "d", "name": "acme/x", **over}
    with pytest.raises(InvalidArgument) as e:
        build_config(flags)
    assert e.value.field == field and field in str(e.value)


def test_yaml_must_be_a_mapping(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(InvalidArgument, match="mapping"):
        build_config({}, y)
