"""docs/configuration.md names every server setting and every engine field a config file can
set, and nothing that does not exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from loraplex.runtime.api.types import EngineConfig
from loraplex.runtime.serve.settings import ServerSettings

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
SET_BY_SERVER = {"base_dir", "quantization", "device", "max_slots", "max_batch", "max_waiting",
                 "host_cache_bytes"}


def _table(heading: str) -> set[str]:
    """Backticked names in the first cell of each row of the table under `heading`."""
    text = DOC.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


def test_every_server_setting_is_documented_and_nothing_else() -> None:
    fields = set(ServerSettings.model_fields)
    documented = _table("## The server")
    assert fields - documented == set(), "undocumented server settings"
    assert documented - fields == set(), "documented settings that do not exist"


def test_every_engine_field_is_documented_and_nothing_else() -> None:
    fields = {f.name for f in dataclasses.fields(EngineConfig)} - SET_BY_SERVER
    documented = _table("## The engine")
    assert fields - documented == set(), "undocumented engine fields"
    assert documented - fields == set(), "documented engine fields that do not exist"
