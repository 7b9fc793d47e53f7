"""bench/gpu_check.sh on a machine without CUDA: parses, and refuses in one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def test_script_and_its_embedded_python_parse():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    body = re.search(r"<<'PYEOF'\n(.*?)\nPYEOF\n", text, re.S)
    assert body, "the JSON-assembling python block is missing"
    compile(body.group(1), "gpu_check.sh:python", "exec")  # runs only on a GPU: check syntax


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script measures for real")
def test_without_cuda_it_fails_in_one_line_and_measures_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PY": sys.executable}, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), proc.stderr
    assert not out.exists()
