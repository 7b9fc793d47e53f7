"""The import direction between packages and between the runtime's folders is a contract
(`.importlinter`), checked here with import-linter so that it cannot rot.

import-linter reads a package from one folder tree, while the checkout installs
`registry/`, `runtime/` and `trainer/` as subpackages of `loraplex` from beside it
(setup.py's package-dir mapping). The test lays the sources out as the wheel does, in a
temporary tree, and runs `lint-imports` over that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED = ("registry", "runtime", "trainer")


def wheel_layout(dest: Path) -> Path:
    """`loraplex/` with the mapped folders inside it, sources only."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "loraplex", dest / "loraplex", ignore=ignore)
    for name in MAPPED:
        shutil.copytree(ROOT / name, dest / "loraplex" / name, ignore=ignore)
    return dest


def lint_imports(tree: Path, config: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(exe), "--no-cache", str(config)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300)


def test_layering_contracts_hold(tmp_path):
    result = lint_imports(wheel_layout(tmp_path), ROOT / ".importlinter")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_the_contract(tmp_path):
    """The check sees the mapped subpackages: the LoRA layer importing the engine fails it."""
    tree = wheel_layout(tmp_path)
    victim = tree / "loraplex" / "runtime" / "lora" / "pool.py"
    victim.write_text(victim.read_text() + "\nfrom loraplex.runtime.engine import plan  # noqa\n")
    result = lint_imports(tree, ROOT / ".importlinter")
    assert result.returncode != 0
    assert "loraplex.runtime.lora.pool -> loraplex.runtime.engine.plan" in result.stdout
