"""`loraplex serve` in a subprocess: SIGTERM drains (health NOT_SERVING, new calls refused,
the in-flight stream completes) and the process exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from loraplex.client import Client
from loraplex.errors import Unavailable
from loraplex.registry import Identity, Registry

pytestmark = pytest.mark.slow


def start_serve(args: list[str], env: dict[str, str]):
    """Run `loraplex serve`; returns (process, port, log lines) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving gRPC on \S+:(\d+)", line)
            if m and not port:
                port.append(int(m.group(1)))
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(120) or not port:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines))
    return proc, port[0], lines


def test_sigterm_drains_in_flight_stream_and_exits_zero(micro_base, tmp_path):
    reg_dir = tmp_path / "reg"
    with Registry.open(reg_dir) as reg:
        token = reg.create_token(Identity.system(), "acme")
    env = {**os.environ, "LORAPLEX_GRACE_S": "30", "LORAPLEX_DRAIN_DELAY_S": "3"}
    proc, port, lines = start_serve(
        ["--base", str(micro_base), "--registry", str(reg_dir), "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--quantization", "none", "--device", "cpu"],
        env)
    try:
        client = Client(f"127.0.0.1:{port}", token=token, timeout=60)
        client.wait_ready(120)
        stream = client.stream(None, "drain me", max_new_tokens=60)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        probe = Client(f"127.0.0.1:{port}", token=token, timeout=10)
        end = time.monotonic() + 10
        while probe.health() != "NOT_SERVING":  # within the drain delay: still listening
            assert time.monotonic() < end
            time.sleep(0.05)
        with pytest.raises(Unavailable) as e:
            probe.generate(None, "new")
        assert "draining" in str(e.value)
        rest = list(stream)
        final = rest[-1].final
        assert final is not None and final.finish_reason == "length"
        assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 60
        assert proc.wait(60) == 0, "".join(lines)
        log = "".join(lines)
        assert "draining" in log and "drained; exiting" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
