"""Reading safetensors files without torch or pickle.

Registration never needs the tensors as torch objects: the header gives names, dtypes and
shapes, and the raw bytes are what the digest covers. Parsing the (simple, documented)
format here keeps `push` light enough for many concurrent writer processes and means a
pickle file can never be executed by accident: anything that is not a well-formed
safetensors file is a validation error.

Format: 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data section; offsets are relative to the start of the data section.

What is accepted is exactly what the `safetensors` loader accepts at serve time, checked
here so that an upload never registers and then fails to load: one entry per name;
every tensor's bytes match its shape and dtype; the tensors, sorted by offset, tile the
data section from its first byte to the file's last with no gap, overlap or trailing
byte. Header size and tensor count are capped (`RegistrySettings.max_header_bytes`,
`.max_tensors`) so one upload cannot make the parser hold hundreds of MiB of JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from loraplex.errors import quote
from loraplex.limits import MAX_TENSOR_NAME_CHARS

# safetensors dtype code -> (torch-style name, item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})

# Bit patterns: a float is NaN or Inf exactly when all its exponent bits are set.
_EXPONENT_MASKS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000), "F64": ("<u8", 0x7FF0000000000000),
}
MAX_HEADER_BYTES = 8 << 20  # default cap on the JSON header (safetensors' own: 100 MB)
MAX_TENSORS = 16384  # default cap on the tensors of one file


class TensorFileError(ValueError):
    """The bytes are not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    code: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # absolute offsets into the file bytes
    end: int

    @property
    def dtype(self) -> str:
        return DTYPES[self.code][0]


@dataclass(frozen=True)
class TensorFile:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    raw: bytes

    def data(self, info: TensorInfo) -> memoryview:
        return memoryview(self.raw)[info.begin:info.end]


def parse(raw: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES,
          max_tensors: int = MAX_TENSORS) -> TensorFile:
    """Parse and bounds-check a safetensors file held in memory."""
    if len(raw) < 8:
        raise TensorFileError("file is shorter than the 8-byte header length")
    n = int.from_bytes(raw[:8], "little")
    if n > max_header_bytes:
        raise TensorFileError(f"header length {n} is out of range: it exceeds the cap of "
                              f"{max_header_bytes} bytes")
    if n <= 0 or 8 + n > len(raw):
        raise TensorFileError("header length is out of range (not a safetensors file?)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise TensorFileError("__metadata__ is not an object")
    if len(header) > max_tensors:
        raise TensorFileError(f"{len(header)} tensors exceed the cap of {max_tensors}")
    tensors = {name: _tensor_info(name, entry, data_start, len(raw))
               for name, entry in header.items()}
    _check_tiling(tensors, data_start, len(raw))
    return TensorFile(tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()},
                      data_start=data_start, raw=raw)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are distinct (`json` would keep the last silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise TensorFileError(f"header names {quote(key)} twice")
        seen.add(key)
    return dict(pairs)


def _check_tiling(tensors: dict[str, TensorInfo], data_start: int, total: int) -> None:
    """The safetensors loader's rule: sorted by offset, tensors cover the data section
    exactly (each begins where the previous ends, the last ends at the end of the file)."""
    at = data_start
    for info in sorted(tensors.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != at:
            what = "overlaps the tensor before it" if info.begin < at else \
                "leaves a gap of unused bytes before it"
            raise TensorFileError(f"tensor {quote(info.name)}: data_offsets {what}")
        at = info.end
    if at != total:
        raise TensorFileError(f"{total - at} bytes after the last tensor's data "
                              "(the safetensors loader refuses trailing bytes)")


def _tensor_info(name: str, entry: object, data_start: int, total: int) -> TensorInfo:
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise TensorFileError(f"tensor name {quote(name)} is longer than "
                              f"{MAX_TENSOR_NAME_CHARS} characters")
    if not isinstance(entry, dict):
        raise TensorFileError(f"tensor {quote(name)}: header entry is not an object")
    code = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if code not in DTYPES:
        raise TensorFileError(f"tensor {quote(name)}: unknown dtype {quote(code)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise TensorFileError(f"tensor {quote(name)}: bad shape {quote(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)):
        raise TensorFileError(f"tensor {quote(name)}: bad data_offsets {quote(offsets)}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if not data_start <= begin <= end <= total:
        raise TensorFileError(f"tensor {quote(name)}: data_offsets point outside the file")
    if end - begin != math.prod(shape) * DTYPES[code][1]:
        raise TensorFileError(f"tensor {quote(name)}: byte length does not match shape and dtype")
    return TensorInfo(name=name, code=code, shape=tuple(shape), begin=begin, end=end)


def count_nonfinite(buf: memoryview, code: str) -> int:
    """How many NaN/Inf values a float tensor's raw bytes hold (0 for non-float dtypes)."""
    if code not in _EXPONENT_MASKS:
        return 0
    view, mask = _EXPONENT_MASKS[code]
    bits = np.frombuffer(buf, dtype=view)
    return int(np.count_nonzero((bits & np.array(mask, dtype=view)) == mask))


def rename(tf: TensorFile, names: dict[str, str]) -> bytes:
    """The same file with tensors renamed (`names`: old -> new); the data bytes are kept."""
    header: dict[str, object] = {}
    if tf.metadata:
        header["__metadata__"] = tf.metadata
    for old, info in tf.tensors.items():
        header[names.get(old, old)] = {
            "dtype": info.code, "shape": list(info.shape),
            "data_offsets": [info.begin - tf.data_start, info.end - tf.data_start]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    return len(blob).to_bytes(8, "little") + blob + tf.raw[tf.data_start:]
