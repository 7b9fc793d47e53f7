"""`make demo` runs the whole story; this runs the same code on the micro base with a few
training steps, so a broken seam (trainer -> gRPC registration -> mixed batch -> hot swap
-> /metrics -> SIGTERM drain) fails the suite, not only the demo."""

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


def test_a_quantile_past_the_top_bucket_is_shown_as_such():
    buckets = [(0.1, 50.0), (1.0, 98.0), (float("inf"), 100.0)]  # 2 of 100 past 1 s
    assert demo.quantile_ms(buckets, 0.5) == "100.0 ms"
    assert demo.quantile_ms(buckets, 0.99) == "> 1000 ms"
    assert demo.quantile_ms([(1.0, 0.0), (float("inf"), 0.0)], 0.5) == "n/a"
