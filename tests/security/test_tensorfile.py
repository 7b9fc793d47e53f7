"""The safetensors parser accepts exactly what the loader accepts at serve time, within caps.

Every crafted file is given to both `tensorfile.parse` and `safetensors.torch.load`:
an upload the loader would refuse must not register (and then fail every request).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from loraplex.errors import InvalidArgument, ValidationFailed
from loraplex.limits import MAX_RANK
from loraplex.registry import Identity, RegistrySettings
from loraplex.registry.tensorfile import TensorFileError, parse

ADMIN = Identity.system()


def _file(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _f32(begin: int, end: int, n: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}


CASES = {
    "overlap": _file({"a": _f32(0, 8, 2), "b": _f32(4, 12, 2)}, bytes(12)),
    "gap": _file({"a": _f32(0, 8, 2), "b": _f32(12, 20, 2)}, bytes(20)),
    "trailing": _file({"a": _f32(0, 8, 2)}, bytes(12)),
    "leading_gap": _file({"a": _f32(4, 12, 2)}, bytes(12)),
    "same_bytes_twice": _file({"a": _f32(0, 8, 2), "b": _f32(0, 8, 2)}, bytes(8)),
    "duplicate_name": struct.pack("<Q", 112) + (
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}').ljust(112) + bytes(8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_files_the_loader_refuses_are_refused(name: str):
    raw = CASES[name]
    with pytest.raises(Exception):  # noqa: B017 - the loader's own error type varies
        load(raw)
    with pytest.raises(TensorFileError):
        parse(raw)


def test_files_the_loader_takes_are_taken():
    tensors = {"z": torch.zeros(0), "a": torch.ones(3, 2), "b": torch.arange(4.0)}
    raw = save(tensors)
    assert set(load(raw)) == set(parse(raw).tensors) == {"z", "a", "b"}


def test_duplicate_names_are_refused_by_name():
    with pytest.raises(TensorFileError, match="'a' twice"):
        parse(CASES["duplicate_name"])


def test_header_size_and_tensor_count_are_capped():
    raw = save({f"t{i}": torch.zeros(1) for i in range(50)})
    with pytest.raises(TensorFileError, match="exceeds the cap"):
        parse(raw, max_header_bytes=256)
    with pytest.raises(TensorFileError, match="50 tensors exceed the cap of 10"):
        parse(raw, max_tensors=10)
    assert len(parse(raw).tensors) == 50
    huge = struct.pack("<Q", 200 << 20) + b"{"  # claims 200 MiB of header
    with pytest.raises(TensorFileError, match="exceeds the cap"):
        parse(huge)


def test_registry_caps_come_from_settings(open_registry, make_adapter):
    reg = open_registry(max_tensors=3)
    with pytest.raises(ValidationFailed) as e:
        reg.push(ADMIN, make_adapter(), "acme/many")
    assert "tensors exceed the cap of 3" in str(e.value)


# ------------------------------------------------------------------------------ one rank limit


def test_registry_and_engine_share_one_rank_limit():
    from loraplex.runtime.api.types import EngineConfig

    assert RegistrySettings().max_rank == MAX_RANK == 256
    assert EngineConfig(base_dir="x").max_rank == MAX_RANK
    assert EngineConfig(base_dir="x").slot_layout.max_rank == MAX_RANK  # the slots hold it
    with pytest.raises(ValueError, match="max_rank"):
        RegistrySettings(max_rank=MAX_RANK + 1)
    with pytest.raises(InvalidArgument) as e:  # settings may lower the limit, never raise it
        EngineConfig(base_dir="x", max_rank=MAX_RANK + 1)
    assert e.value.field == "max_rank"


def test_rank_above_the_engine_limit_is_refused_at_registration(sqlite_reg, make_adapter):
    with pytest.raises(ValidationFailed) as e:
        sqlite_reg.push(ADMIN, make_adapter(r=MAX_RANK + 1), "acme/wide")
    assert e.value.field == "r" and f"maximum {MAX_RANK}" in str(e.value)
    with pytest.raises(ValidationFailed) as e:
        sqlite_reg.push(ADMIN, make_adapter(config={"rank_pattern": {"q_proj": MAX_RANK + 1}}),
                        "acme/wide")
    assert any(v.startswith("rank_pattern:") for v in e.value.violations)


def test_invalid_argument_is_the_base_of_validation_failed():
    assert issubclass(ValidationFailed, InvalidArgument)
