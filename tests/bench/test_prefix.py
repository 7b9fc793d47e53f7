"""bench.prefix in its quickest form on the micro base: it runs, the cache-on engine computes
fewer prefill tokens and answers every request exactly as the cache-off one. Timing is the
benchmark's business, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_on_the_micro_base_reuses_prefixes_and_changes_no_output(micro_base):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.prefix", "--quick", "--json", "--base", str(micro_base),
         "--system-tokens", "128", "--questions", "2", "--max-new", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    f = json.loads(proc.stdout)
    assert f["requests"] == 16 and f["tenants"] == 8
    assert f["outputs_identical"], f
    off, on = f["off"], f["on"]
    assert off["prompt_tokens"] == on["prompt_tokens"] == off["prefill_tokens"]
    assert off["prefix_lookups"] == 0
    # a second request reuses its tenant's 128-token system prompt unless the first is still
    # prefilling (at most 3 are: 4 clients), so at least 5 of the 8 hit
    assert on["prefix_lookups"] == 16 and on["prefix_hits"] >= 5
    assert on["prefill_tokens"] <= off["prefill_tokens"] - 5 * 128
