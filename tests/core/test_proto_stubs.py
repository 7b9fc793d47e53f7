"""The committed stubs in loraplex/v1 match proto/, and `pip install .` ships working stubs."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex import protogen

REPO = Path(__file__).resolve().parents[2]
# Lines that name the generator's version: they differ between grpcio-tools releases even
# when the contract is the same, so drift is judged without them.
_VERSION_LINE = re.compile(r"(Protobuf Python Version|GRPC_GENERATED_VERSION|^\s*\d+,\s*$)")


def _normalised(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if not _VERSION_LINE.search(ln)]


def test_committed_stubs_match_proto_files(tmp_path):
    fresh = protogen.generate(tmp_path)
    committed = protogen.generated_files(REPO)
    names = sorted(p.name for p in committed)
    assert names == sorted(p.name for p in fresh), "stub set differs: run `make proto`"
    for new in fresh:
        old = REPO / "loraplex" / "v1" / new.name
        assert _normalised(old) == _normalised(new), f"{old} is stale: run `make proto`"


def test_committed_descriptors_match_proto_files(tmp_path):
    """Version-independent check: the serialized descriptors equal protoc's fresh ones."""
    protogen.generate(tmp_path)
    for proto in protogen.proto_files():
        module = f"loraplex.v1.{proto.stem}_pb2"
        committed = importlib.import_module(module).DESCRIPTOR.serialized_pb
        code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import {module} as m; "
                "sys.stdout.buffer.write(m.DESCRIPTOR.serialized_pb)")
        fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                               cwd=tmp_path).stdout
        assert committed == fresh, f"{module} drifted from {proto.name}: run `make proto`"


def test_every_service_is_importable():
    from loraplex.v1 import admin_pb2_grpc, inference_pb2_grpc, registry_pb2_grpc

    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")
    assert hasattr(registry_pb2_grpc, "RegistryServiceStub")
    assert hasattr(admin_pb2_grpc, "AdminServiceStub")


@pytest.mark.slow
def test_non_editable_install_ships_stubs(tmp_path):
    """`pip install .` from a clean copy of the tree yields importable, working stubs."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((REPO / rel).read_bytes())
    if not (src / "README.md").exists():  # the README may not be written yet
        (src / "README.md").write_text("loraplex\n")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(src)],
                   check=True, capture_output=True, cwd=tmp_path)
    code = ("import loraplex, loraplex.v1.inference_pb2 as p, loraplex.v1.inference_pb2_grpc as g;"
            "r = p.GenerateRequest(adapter='a/b@prod', prompt='hi');"
            "assert p.GenerateRequest.FromString(r.SerializeToString()) == r;"
            "assert hasattr(g, 'InferenceServiceStub');"
            "print(loraplex.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}).stdout
    assert out.strip().startswith(str(target)), out
