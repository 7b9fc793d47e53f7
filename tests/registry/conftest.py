"""Registry fixtures: real registries on SQLite and PostgreSQL, real adapter files."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import save_file

from loraplex.fingerprint import BaseFingerprint, fingerprint_base
from loraplex.registry import Registry, RegistrySettings
from tests.registry.s3server import S3_ENV, MotoServer

DEFAULT_TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="session")
def micro_fp(micro_base: Path) -> BaseFingerprint:
    return fingerprint_base(micro_base)


def adapter_files(shapes: dict[str, tuple[int, int]], *, r: int = 4, alpha: float = 8,
                  targets: tuple[str, ...] = DEFAULT_TARGETS, seed: int = 0,
                  dtype: torch.dtype = torch.float32, prefix: bool = True,
                  base_name: str = "", config: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A peft-layout LoRA adapter (config dict, tensors) for a base with `shapes`."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (fan_in, fan_out) in shapes.items():
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        key = ("base_model.model." if prefix else "") + module
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g).to(dtype)
        tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g).to(dtype)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
           "base_model_name_or_path": base_name, "bias": "none", "use_rslora": False,
           "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "fan_in_fan_out": False}
    cfg.update(config or {})
    return cfg, tensors


def write_adapter(out: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture
def make_adapter(tmp_path: Path, micro_fp: BaseFingerprint, micro_base: Path
                 ) -> Callable[..., Path]:
    """make_adapter(seed=…, r=…, …) -> a directory holding a valid adapter for micro_base."""
    counter = iter(range(10_000))

    def make(**kw: Any) -> Path:
        kw.setdefault("base_name", str(micro_base))
        cfg, tensors = adapter_files(micro_fp.linear_shapes, **kw)
        return write_adapter(tmp_path / f"adapter{next(counter)}", cfg, tensors)

    return make


def sqlite_registry(root: Path, **settings: Any) -> Registry:
    return Registry.open(root / "reg", settings=RegistrySettings(**settings))


@pytest.fixture
def pg_schema(pg_url: str) -> Iterator[str]:
    """A fresh PostgreSQL schema per test (dropped after), so parallel runs never collide."""
    schema = f"lpx_test_{uuid.uuid4().hex[:12]}"
    yield schema
    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    eng.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def db_location(request: pytest.FixtureRequest, tmp_path: Path
                ) -> tuple[str, dict[str, Any]]:
    """(location, Registry.open kwargs) for each database backend."""
    if request.param == "sqlite":
        return str(tmp_path / "reg"), {}
    pg_url = request.getfixturevalue("pg_url")
    schema = request.getfixturevalue("pg_schema")
    return pg_url, {"blob_dir": str(tmp_path / "blobs"),
                    "settings": RegistrySettings(db_schema=schema)}


@pytest.fixture
def registry(db_location: tuple[str, dict[str, Any]]) -> Iterator[Registry]:
    location, kwargs = db_location
    reg = Registry.open(location, **kwargs)
    yield reg
    reg.close()


@pytest.fixture
def sqlite_reg(tmp_path: Path) -> Iterator[Registry]:
    reg = sqlite_registry(tmp_path)
    yield reg
    reg.close()



@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """One moto S3 server for the session (tests that kill a server start their own)."""
    server = MotoServer()
    yield server
    server.kill()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake credentials in this process's environment (boto3 reads them there)."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    return dict(S3_ENV)
