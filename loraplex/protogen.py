"""Regenerate the committed gRPC stubs in `loraplex/v1/` from `proto/loraplex/v1/*.proto`.

    python -m loraplex.protogen            # rewrite loraplex/v1/*_pb2*.py and *.pyi
    python -m loraplex.protogen --out DIR  # write them under DIR/loraplex/v1/ instead

The stubs are committed so that `pip install .` needs no protoc; `tests/core/test_proto_stubs.py`
regenerates into a temporary directory and fails when the committed files have drifted.
`-I proto` makes the generated modules import each other as `loraplex.v1.x_pb2`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PACKAGE = Path("loraplex") / "v1"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The contract's .proto files, sorted so that generation is deterministic."""
    return sorted((proto_root / PACKAGE).glob("*.proto"))


def generate(out_dir: Path = REPO, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (bundled with grpcio-tools) and return the files it wrote."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    well_known = resources.files("grpc_tools") / "_proto"
    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PACKAGE}")
    target = out_dir / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(str(p.relative_to(proto_root)) for p in protos)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    init = target / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC stubs; regenerate with `python -m loraplex.protogen`."""\n')
    return generated_files(out_dir)


def generated_files(out_dir: Path = REPO) -> list[Path]:
    """Every generated stub file under `out_dir/loraplex/v1`, sorted."""
    target = out_dir / PACKAGE
    return sorted(p for pattern in ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")
                  for p in target.glob(pattern))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO,
                        help="root directory; stubs go to OUT/loraplex/v1")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
