"""`/v1/models` pages (`EngineBackend.models`, what the HTTP door lists) over the registry's
keyset pages, on SQLite and PostgreSQL: a page from any cursor, the base first, each model
once, and a plain listing of everything."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from loraplex.errors import InvalidArgument
from loraplex.fingerprint import fingerprint_base
from loraplex.registry import Identity, Registry, RegistrySettings
from loraplex.runtime.serve.openai.binding import EngineBackend
from tests.registry.conftest import adapter_files, write_adapter

ADMIN = Identity.system()
NAMES = ("acme/a", "acme/b", "acme/c", "beta/d", "beta/e")


@pytest.fixture(params=["sqlite", "postgres"])
def registry(request: pytest.FixtureRequest, tmp_path: Path, micro_base: Path
             ) -> Iterator[Registry]:
    schema = None
    if request.param == "sqlite":
        reg = Registry.open(tmp_path / "reg")
    else:
        pg_url = request.getfixturevalue("pg_url")
        schema = f"lpx_test_{uuid.uuid4().hex[:12]}"
        reg = Registry.open(pg_url, blob_dir=str(tmp_path / "blobs"),
                            settings=RegistrySettings(db_schema=schema))
    shapes = fingerprint_base(micro_base).linear_shapes
    for i, name in enumerate(NAMES):
        cfg, tensors = adapter_files(shapes, seed=i, base_name=str(micro_base))
        reg.push(ADMIN, write_adapter(tmp_path / f"a{i}", cfg, tensors), name, base=micro_base)
    yield reg
    reg.close()
    if schema is not None:
        eng = sa.create_engine(request.getfixturevalue("pg_url"))
        with eng.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        eng.dispose()


def _walk(backend: EngineBackend, identity: Identity, limit: int) -> list[list[str]]:
    """Pages of `limit` as an OpenAI client walks them: `after` = the last id seen."""
    pages, after = [], None
    while True:
        names = backend.models(identity, limit=limit + 1, after=after)  # +1: has_more
        pages.append(names[:limit])
        if len(names) <= limit:
            return pages
        after = names[limit - 1]


def test_models_page_from_any_cursor_base_first(registry: Registry) -> None:
    backend = EngineBackend(None, registry, base_name="micro")
    assert backend.models(ADMIN) == ["micro", *NAMES]
    assert _walk(backend, ADMIN, 2) == [["micro", "acme/a"], ["acme/b", "acme/c"],
                                        ["beta/d", "beta/e"]]
    assert _walk(backend, Identity("beta"), 1) == [["micro"], ["beta/d"], ["beta/e"]]
    assert backend.models(Identity("acme"), after="micro") == ["acme/a", "acme/b", "acme/c"]
    assert backend.models(ADMIN, limit=2, after="acme/bb") == ["acme/c", "beta/d"]
    with pytest.raises(InvalidArgument) as e:
        backend.models(ADMIN, limit=2, after="not a model id")
    assert e.value.field == "after"
