"""Server settings: flags over LORAPLEX_* env over the config file over defaults."""

from __future__ import annotations

import pytest

from loraplex.errors import InvalidArgument
from loraplex.runtime.serve.settings import load_settings


def test_precedence_flags_env_file_defaults(tmp_path, monkeypatch):
    config = tmp_path / "server.yaml"
    config.write_text("port: 1111\nmetrics-port: 2222\ngrace_s: 5\nengine:\n  max_rank: 16\n")
    monkeypatch.setenv("LORAPLEX_PORT", "3333")
    s = load_settings({"metrics_port": None, "base": str(tmp_path)}, config)
    assert (s.port, s.metrics_port, s.grace_s, s.engine) == (3333, 2222, 5.0, {"max_rank": 16})
    assert load_settings({"port": 4444}, config).port == 4444
    monkeypatch.delenv("LORAPLEX_PORT")
    assert load_settings().port == 50051


def test_toml_config_and_engine_passthrough(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('quantization = "none"\n[engine]\nmax_rank = 8\n')
    s = load_settings({"base": str(tmp_path)}, config)
    cfg = s.engine_config()
    assert (cfg.quantization, cfg.max_rank, cfg.max_batch) == ("none", 8, s.max_batch)


@pytest.mark.parametrize("flags,text,field", [
    ({"port": -1}, "", "port"),
    ({}, "bogus: 1\n", "bogus"),
    ({}, "engine:\n  max_slots: 3\n", "engine"),
    ({}, "- a list\n", "config"),
])
def test_bad_settings_name_the_field(tmp_path, flags, text, field):
    config = tmp_path / "server.yaml"
    config.write_text(text)
    with pytest.raises(InvalidArgument) as e:
        load_settings(flags, config)
    assert e.value.field == field


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(ValueError):
        s.port = 1


def test_cuda_graphs_from_the_config_file_reach_the_engine_and_cpu_refuses_them(tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text("device: cuda\nengine:\n  cuda_graphs: true\n")
    assert load_settings({"base": str(tmp_path)}, config).engine_config().cuda_graphs
    with pytest.raises(InvalidArgument) as e:
        load_settings({"base": str(tmp_path), "device": "cpu"}, config).engine_config()
    assert e.value.field == "cuda_graphs"
