"""`pip install .` (not editable) must give a working package: the three top-level folders
install as loraplex.registry / loraplex.runtime / loraplex.trainer, stubs included."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_non_editable_install_imports(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    code = (
        "import loraplex, loraplex.registry, loraplex.runtime, loraplex.trainer, loraplex.v1\n"
        "import loraplex.cli\n"
        "print(loraplex.registry.__file__)\n"
    )
    # Run from an unrelated directory so the checkout itself cannot be imported by accident.
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(target)})
    assert str(target) in out.stdout
    installed = {p.name for p in (target / "loraplex").iterdir()}
    assert {"registry", "runtime", "trainer", "v1"} <= installed
