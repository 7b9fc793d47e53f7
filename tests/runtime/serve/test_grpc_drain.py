"""`loraplex serve` in a subprocess: SIGTERM drains (health NOT_SERVING, new calls refused,
the in-flight stream completes) and the process exits 0, promptly once drained."""

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
    """Run `loraplex serve`; returns (process, port, log lines, arrival times) once it
    listens; `arrivals[i]` is the `time.monotonic()` at which `lines[i]` was read."""
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    stamps: list[float] = []
    found = threading.Event()
    port: list[int] = []

    def pump():
        for line in proc.stdout:
            stamps.append(time.monotonic())
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
    return proc, port[0], lines, stamps


def test_sigterm_drains_in_flight_stream_and_exits_zero(micro_base, tmp_path):
    reg_dir = tmp_path / "reg"
    with Registry.open(reg_dir) as reg:
        token = reg.create_token(Identity.system(), "acme")
    env = {**os.environ, "LORAPLEX_GRACE_S": "30", "LORAPLEX_DRAIN_DELAY_S": "3"}
    proc, port, lines, stamps = start_serve(
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
        exited = time.monotonic()
        log = "".join(lines)
        assert "draining" in log and "drained; exiting" in log
        assert "Traceback" not in log
        drained_at = stamps[next(i for i, x in enumerate(lines) if "drained; exiting" in x)]
        # Was 2 s (quiet machine) to 10 s (busy) of interpreter teardown at full CPU; now
        # the process ends right after its drain. The bound only catches a hang.
        assert exited - drained_at < 10, f"exited {exited - drained_at:.1f}s after draining"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exit_after_drain_skips_teardown_but_runs_atexit_and_flushes():
    """`exit_process` (what `loraplex serve` ends with): the exit code, atexit handlers and
    buffered output survive; the interpreter's module teardown (seconds of CPU once torch
    and transformers are loaded) does not run; a leftover non-daemon thread is named in the
    log instead of holding the process forever."""
    code = """if True:
        import atexit, threading
        from loraplex.runtime.serve import server

        class Teardown:
            def __del__(self):
                print("module teardown ran", flush=True)

        keep = Teardown()
        atexit.register(print, "atexit ran")
        threading.Thread(target=threading.Event().wait, name="leftover").start()
        server.EXIT_JOIN_S = 0.2
        print("unflushed output", end="")
        server.exit_process(3)
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3, out.stderr
    assert "atexit ran" in out.stdout and "unflushed output" in out.stdout
    assert "module teardown ran" not in out.stdout
    assert "'leftover' still running at exit" in out.stderr
