"""What a user installs serves: build the wheel, install it (not editable) into a fresh
virtualenv outside the checkout, run `loraplex serve` from that virtualenv and talk to it
over a real channel.

The fresh virtualenv gets the wheel only; the third-party dependencies (torch,
transformers, grpcio …) are made visible through a `.pth` line naming this test
environment's site-packages, which Python appends after the virtualenv's own site-packages.
A `.pth` line adds a directory but does not run the `.pth` files inside it, so the
editable install of the checkout living there stays inert: `loraplex` can only come from
the wheel, and the test checks that it does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.client import Client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The folders that install as loraplex.* (setup.py's PACKAGE_DIRS) and what the sdist needs.
SOURCES = {"loraplex": "loraplex", "registry": "loraplex/registry",
           "runtime": "loraplex/runtime", "trainer": "loraplex/trainer"}
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")


def build_wheel(out: Path) -> Path:
    """`pip wheel` from a copy of the sources, so the build leaves nothing in the checkout."""
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in BUILD_FILES:
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = (out / "dist").glob("loraplex-*.whl")
    return wheel


def make_venv(where: Path, wheel: Path) -> Path:
    """A fresh virtualenv holding the wheel; the dependencies come from this environment."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site.stdout.strip(), "test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)
    return where / "bin"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
           and not k.startswith("LORAPLEX_")}
    return {**env, "PYTHONNOUSERSITE": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_every_source_module_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{dest}/{p.relative_to(ROOT / folder).as_posix()}"
                for folder, dest in SOURCES.items() for p in (ROOT / folder).rglob("*")
                if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    assert not missing, f"modules left out of the wheel: {missing}"
    assert "loraplex/runtime/serve/servicers/inference.py" in names
    # the console's pages, stylesheet and script are package data, not modules
    console = ROOT / "runtime" / "serve" / "console"
    data = {f"loraplex/runtime/serve/console/{p.relative_to(console).as_posix()}"
            for folder in ("templates", "static") for p in (console / folder).iterdir()}
    assert data and not data - names, f"console files left out: {sorted(data - names)}"


@pytest.fixture(scope="module")
def venv_bin(wheel, tmp_path_factory) -> Path:
    return make_venv(tmp_path_factory.mktemp("venv") / "venv", wheel)


def test_installed_wheel_serves_outside_the_checkout(venv_bin, tmp_path, micro_base):
    work = tmp_path / "elsewhere"  # outside the checkout: its loraplex/ cannot shadow
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    bin_dir, env = venv_bin, clean_env()

    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import loraplex.runtime.serve.servicers as s; "
         "print(s.__file__)"], cwd=work, env=env, check=True, capture_output=True, text=True)
    assert where.stdout.startswith(str(bin_dir.parent)), where.stdout

    proc = subprocess.Popen(
        [str(bin_dir / "loraplex"), "serve", "--base", str(micro_base), "--registry",
         str(work / "registry"), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--no-auth", "--quantization", "none", "--device", "cpu"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    port: list[int] = []
    listening = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving gRPC on \S+:(\d+)", line)
            if m and not port:
                port.append(int(m.group(1)))
                listening.set()
        listening.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert listening.wait(120) and port, "server did not start:\n" + "".join(lines)
        target = f"127.0.0.1:{port[0]}"
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            end = time.monotonic() + 120
            while True:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert time.monotonic() < end and proc.poll() is None, "".join(lines)
                time.sleep(0.1)
        with Client(target, timeout=60) as client:
            result = client.generate(None, "hello from the wheel", max_new_tokens=5)
        assert result.completion_tokens == 5 or result.finish_reason == "stop"
        assert result.completion_tokens > 0
        proc.terminate()
        assert proc.wait(60) == 0, "".join(lines)
        assert "drained; exiting" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_the_same_wheel(dockerfile):
    """Docker does not run here: check the images build the wheel from every source folder
    (the stage is identical in both files) and install that wheel, not the source tree."""
    text = (ROOT / "deploy" / dockerfile).read_text()
    stage = re.search(r"^FROM python:3\.11-slim AS wheel\n(.*?)\n\n", text, re.S | re.M)
    assert stage, f"{dockerfile} has no `wheel` build stage"
    other = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    assert stage.group(0) in other
    for name in (*SOURCES, *BUILD_FILES):
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b", stage.group(1), re.M), name
    assert "pip wheel" in stage.group(1)
    assert re.search(r"^COPY --from=wheel /wheels /wheels$", text, re.M)
    assert re.search(r"^RUN pip install /wheels/loraplex-\*\.whl", text, re.M)
    assert not re.search(r"pip install (-e )?\.", text)


def test_benchmarks_in_the_checkout_ask_for_the_editable_install(venv_bin):
    """From the checkout its loraplex/ folder hides a regular install: `bench` says so in one
    line (bench/README.md, "How to run") instead of failing deep inside a run."""
    out = subprocess.run([str(venv_bin / "python"), "-m", "bench.lora_ops", "--quick"],
                         cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "editable" in out.stderr and "make bench" in out.stderr
    assert "Traceback" not in out.stderr
