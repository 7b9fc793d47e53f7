"""`make demo` runs the whole story; this runs the same code on the micro base with a few
training steps, so a broken seam (trainer -> gRPC registration -> mixed batch -> hot swap
-> /metrics -> SIGTERM drain) fails the suite, not only the demo."""

import re
import subprocess
import sys

from loraplex.app import demo


def test_demo_story_runs_end_to_end_on_the_micro_base(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "loraplex.app.demo", "--out", str(tmp_path / "demo"), "--base",
         "micro", "--n-train", "32", "--n-test", "4", "--max-steps", "2",
         "--quantization", "none", "--train-quantization", "none"],
        capture_output=True, text=True, timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    for tenant in ("acme/router:v1", "globex/sentiment:v1", "initech/numwords:v1"):
        assert f"registered {tenant} over gRPC" in log
    assert "held-out exact-match" in log and "rows = model, columns = task" in log
    assert "openai client -> POST /v1/chat/completions model='globex/sentiment@prod'" in log
    assert "acme/router@prod v1 -> v2 during traffic" in log and "failed: 0" in log
    assert "time to first token" in log and "inter-token latency" in log
    assert "exited 0" in log
    phases_are_announced_with_their_elapsed_time(out.stdout)


# every phase, in order: announced before it runs (a slow machine never shows a silent
# terminal) and reported when done, each line stamped with the time since the demo began
PHASES = ["[1] base: building the micro embedded base ...", "[1] base: built",
          "compute: choosing the dtypes", "compute: training (none base) in ",
          "compute: serving (none base) in ",
          "[2] training acme/router (2 steps, none base) ...", "[2] trained acme/router: 2 steps",
          "[2] training globex/sentiment", "[2] trained globex/sentiment",
          "[2] training initech/numwords", "[2] trained initech/numwords",
          "[3] starting `loraplex serve` (none base) ...", "[3] server up in ",
          "[3] web console: http://127.0.0.1:",
          "[4] BatchGenerate: sending 24 items", "[4] BatchGenerate: 24 items",
          "[4] cross matrix: every adapter", "[4] cross matrix done in ",
          "[5] compressing acme/router@prod into v2", "[5] compressed into acme/router:v2",
          "[5] hot swap:",
          "[6] latency", "[7] stopping the server", "[7] server drained"]


def phases_are_announced_with_their_elapsed_time(stdout: str) -> None:
    stamped = [(m.group(1), m.group(2)) for m in
               (re.match(r"^\[(\d\d:\d\d)\] (.*)$", line) for line in stdout.splitlines()) if m]
    texts = [text for _, text in stamped]
    at = -1
    for phase in PHASES:
        hits = [i for i, text in enumerate(texts) if text.startswith(phase) and i > at]
        assert hits, f"no stamped line {phase!r} after {texts[at] if at >= 0 else 'the start'!r}"
        at = hits[0]
    stamps = [int(mm) * 60 + int(ss) for mm, ss in (s.split(":") for s, _ in stamped)]
    assert stamps == sorted(stamps)  # elapsed time only grows
    assert re.search(r"compute: training \(none base\) in (float32|bfloat16): \S", stdout)
    # the server's own Stats say what it computes in
    assert re.search(r"server up in \d+s:[\s\S]*?none\s+base\s+computing\s+in\s+"
                     r"(float32|bfloat16)\s+\(\S", stdout)


def test_a_quantile_past_the_top_bucket_is_shown_as_such():
    buckets = [(0.1, 50.0), (1.0, 98.0), (float("inf"), 100.0)]  # 2 of 100 past 1 s
    assert demo.quantile_ms(buckets, 0.5) == "100.0 ms"
    assert demo.quantile_ms(buckets, 0.99) == "> 1000 ms"
    assert demo.quantile_ms([(1.0, 0.0), (float("inf"), 0.0)], 0.5) == "n/a"
