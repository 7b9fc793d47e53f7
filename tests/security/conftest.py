"""Fixtures for the hostile-tenant tests: the registry package's real registries and
adapter files (SQLite, PostgreSQL, a moto S3 server), each with the micro base registered
so that pushes find it by the adapters' `base_model_name_or_path`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loraplex.registry import Identity, Registry, RegistrySettings
from tests.registry.conftest import (  # noqa: F401 - pytest finds fixtures by name
    db_location,
    make_adapter,
    micro_fp,
    moto_server,
    pg_schema,
    s3_env,
)


@pytest.fixture
def registry(db_location: tuple[str, dict[str, Any]],  # noqa: F811
             micro_base: Path) -> Iterator[Registry]:
    location, kwargs = db_location
    with Registry.open(location, **kwargs) as reg:
        reg.register_base(Identity.system(), micro_base)
        yield reg


@pytest.fixture
def open_registry(tmp_path: Path, micro_base: Path) -> Iterator[Callable[..., Registry]]:
    """open_registry(name="reg", blob_dir=None, **settings) -> a SQLite registry (closed
    after the test) with the micro base registered."""
    opened: list[Registry] = []

    def open_(name: str = "reg", blob_dir: str | None = None, **settings: Any) -> Registry:
        reg = Registry.open(tmp_path / name, blob_dir=blob_dir,
                            settings=RegistrySettings(**settings))
        reg.register_base(Identity.system(), micro_base)
        opened.append(reg)
        return reg

    yield open_
    for reg in opened:
        reg.close()


@pytest.fixture
def sqlite_reg(open_registry: Callable[..., Registry]) -> Registry:
    return open_registry()
