"""A full disk, read-only storage and a process without write permission, for real.

A size-limited tmpfs gives a real ENOSPC; a read-only bind mount a real EROFS (we run as
root, and root ignores mode bits: the permission case drops root's DAC capabilities with
`setpriv`, which then obeys them exactly as an ordinary user would). Each case must end
as a typed error that names the path, never as a bug, and leave no half-written state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.errors import (
    FailedPrecondition,
    LoraplexError,
    NotFound,
    StorageFull,
    StorageReadOnly,
)
from loraplex.registry import Identity, Registry
from loraplex.registry.cli import app as cli_app

ME = Identity.system()


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _seed_registry(root: Path, make_adapter, micro_base: Path) -> Path:
    """A closed registry at root/reg holding acme/support:v1 with alias prod."""
    with Registry.open(root / "reg") as reg:
        reg.register_base(ME, micro_base)
        reg.push(ME, make_adapter(seed=1), "acme/support")
        reg.set_alias(ME, "acme/support:v1", "prod")
    return root / "reg"


def test_full_disk_is_resource_exhausted_names_the_path_and_leaves_nothing_half_written(
        mounts, fill, make_adapter, micro_base, tmp_path):
    disk = mounts.tmpfs(tmp_path / "disk", 1024)
    reg = Registry.open(disk / "reg")
    reg.register_base(ME, micro_base)
    v1 = reg.push(ME, make_adapter(seed=1), "acme/support")
    filler = fill(disk)

    with pytest.raises(StorageFull) as pushed:
        reg.push(ME, make_adapter(seed=2), "acme/support")
    assert pushed.value.code == "RESOURCE_EXHAUSTED"
    assert str(disk / "reg" / "blobs") in pushed.value.message and "full" in pushed.value.message
    assert [v.ref for v in reg.list_versions(ME, "acme/support")] == [v1.ref]  # no version
    assert not list((disk / "reg" / "blobs").rglob(".tmp-*"))  # no partial blob left
    assert reg.verify() == []  # every blob under its final name is whole
    with pytest.raises(StorageFull) as moved:  # the metadata DB is on the same full disk
        reg.set_alias(ME, v1.ref, "prod")
    assert "registry.db" in moved.value.message
    assert reg.aliases(ME, "acme/support") == {}

    filler.unlink()  # space again: the same registry works, numbering continues
    assert reg.push(ME, make_adapter(seed=2), "acme/support").ref == "acme/support:v2"
    reg.close()


def test_read_only_registry_lists_shows_pulls_and_verifies_and_refuses_writes(
        mounts, make_adapter, micro_base, tmp_path):
    src = _seed_registry(tmp_path / "src", make_adapter, micro_base)
    before = _files(src)
    ro = mounts.read_only(src.parent, tmp_path / "ro") / "reg"

    with Registry.open(ro) as reg:
        assert reg.read_only
        listed, _ = reg.list_adapters(ME)
        assert [v.ref for v in listed] == ["acme/support:v1"]
        prod = reg.resolve(ME, "acme/support@prod")
        assert reg.aliases(ME, "acme/support") == {"prod": 1}
        assert [m.to_version for m in reg.alias_history(ME, "acme/support")] == [1]
        out = reg.pull(ME, "acme/support@prod", tmp_path / "out")
        assert (out / "adapter_model.safetensors").stat().st_size > 0
        assert reg.load_adapter(prod).tensors and reg.verify() == []
        assert [c.kind for c in reg.changes()] == ["version_created", "alias_moved"]
        assert reg.register_base(ME, micro_base).digest == prod.base.digest  # known: no write
        writes = [lambda: reg.push(ME, make_adapter(seed=2), "acme/support"),
                  lambda: reg.set_alias(ME, "acme/support:v1", "stable"),
                  lambda: reg.delete_version(ME, "acme/support:v1", force=True),
                  lambda: reg.create_token(ME, "acme"), lambda: reg.gc(min_age_s=0)]
        for write in writes:
            with pytest.raises(StorageReadOnly) as refused:
                write()
            assert refused.value.code == "FAILED_PRECONDITION"
            assert str(ro / "registry.db") in refused.value.message
    runner, env = CliRunner(), {"LORAPLEX_REGISTRY": str(ro), "LORAPLEX_TOKEN": None}
    for args in (["list"], ["show", "acme/support@prod"], ["verify"],
                 ["pull", "acme/support@prod", str(tmp_path / "cli-out")]):
        result = runner.invoke(cli_app, args, env=env)
        assert result.exit_code == 0, (args, result.output, result.exception)
    refused = runner.invoke(cli_app, ["alias", "acme/support:v1", "stable"], env=env)
    assert refused.exit_code == 1 and refused.stderr.startswith("error: FAILED_PRECONDITION: ")
    assert _files(src) == before  # opening and reading wrote nothing (no WAL, no journal)


def test_read_only_blob_directory_refuses_the_push_and_leaves_no_version(
        mounts, make_adapter, micro_base, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'meta' / 'registry.db'}"
    (tmp_path / "blobs" / "sha256").mkdir(parents=True)
    blobs = mounts.read_only(tmp_path / "blobs", tmp_path / "blobs-ro")
    with Registry.open(db_url, blob_dir=blobs) as reg:
        reg.register_base(ME, micro_base)
        with pytest.raises(StorageReadOnly) as e:
            reg.push(ME, make_adapter(seed=1), "acme/support")
        assert str(blobs) in e.value.message and "read-only" in e.value.message
        with pytest.raises(NotFound):
            reg.list_versions(ME, "acme/support")


def test_read_only_file_that_is_not_a_registry_is_a_precondition_not_a_bug(mounts, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "registry.db").touch()  # empty: a SQLite file without our tables
    (tmp_path / "src" / "blobs" / "sha256").mkdir(parents=True)
    ro = mounts.read_only(tmp_path / "src", tmp_path / "ro")
    with Registry.open(ro) as reg, pytest.raises(FailedPrecondition) as e:
        reg.list_adapters(ME)
    assert "no loraplex tables" in e.value.message and str(ro) in e.value.message


def _capless(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI as root without CAP_DAC_OVERRIDE: mode bits apply, as for a user."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    return subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner",
         sys.executable, "-m", "loraplex.cli", *args],
        capture_output=True, text=True, env=env, timeout=120)


def test_unwritable_registry_root_ignores_mode_bits_the_cli_does_not(
        make_adapter, micro_base, tmp_path):
    reg_dir = _seed_registry(tmp_path, make_adapter, micro_base)
    subprocess.run(["chmod", "-R", "a-w", str(reg_dir)], check=True)
    try:
        with Registry.open(reg_dir) as reg:  # root: mode bits do not stop it
            assert not reg.read_only
            assert reg.push(ME, make_adapter(seed=2), "acme/support").version == 2
        listed = _capless("registry", "list", "--registry", str(reg_dir), "--json")
        assert listed.returncode == 0, listed.stderr
        assert [v["ref"] for v in json.loads(listed.stdout)] == ["acme/support:v2"]
        pushed = _capless("registry", "push", str(make_adapter(seed=3)), "--name",
                          "acme/support", "--registry", str(reg_dir))
        assert pushed.returncode == 1 and "Traceback" not in pushed.stderr
        line, = pushed.stderr.strip().splitlines()  # one line, naming code and file
        assert line.startswith("error: FAILED_PRECONDITION: ") and "read-only" in line
        assert str(reg_dir / "registry.db") in line
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(reg_dir)], check=True)


def test_every_storage_error_is_typed(tmp_path):
    """The errno table itself: what each failure becomes (no mount needed)."""
    import errno

    from loraplex.registry.faults import os_error

    want = {errno.ENOSPC: "RESOURCE_EXHAUSTED", errno.EDQUOT: "RESOURCE_EXHAUSTED",
            errno.EROFS: "FAILED_PRECONDITION", errno.EACCES: "FAILED_PRECONDITION",
            errno.EPERM: "FAILED_PRECONDITION", errno.EIO: "UNAVAILABLE"}
    for code, grpc_code in want.items():
        e = os_error(OSError(code, os.strerror(code)), "writing blob into", tmp_path)
        assert isinstance(e, LoraplexError) and e.code == grpc_code
        assert str(tmp_path) in e.message and os.strerror(code) in e.message
