"""Small datasets and a helper that runs `loraplex train` in-process with test-sized settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.trainer.tasks import make_split, write_jsonl


@pytest.fixture(scope="session")
def acme_data(tmp_path_factory) -> Path:
    """40 ticket-routing examples: enough for a few steps and an 8-example validation split."""
    train, _ = make_split("acme", seed=0, n_train=40, n_test=1)
    path = tmp_path_factory.mktemp("data") / "acme.jsonl"
    write_jsonl(path, train)
    return path


@pytest.fixture
def quick_flags():
    """quick_flags(base, data, tmp, **overrides) -> flags for `run_train`."""
    return _quick_flags


def _quick_flags(base: Path, data: Path, tmp: Path, **over) -> dict:
    """Flags for a fast CPU run: fp32 (no quantization), 6 steps, checkpoint every 2."""
    flags = {"base": str(base), "data": str(data), "name": "acme/upper",
             "quantization": "none", "max_steps": 6, "eval_steps": 2, "batch_size": 4,
             "lr": 1e-3, "val_fraction": 0.2, "eval_max_new_tokens": 8, "logging_steps": 1,
             "output_dir": str(tmp / "run"), "registry": str(tmp / "registry")}
    flags.update(over)
    return flags


@pytest.fixture
def read_metrics():
    """read_metrics(run_dir) -> the records of metrics.jsonl."""
    return _read_metrics


def _read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
