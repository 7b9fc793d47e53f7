#!/usr/bin/env bash
# The GPU measurement in one command, on a machine where torch sees CUDA (at most ~10 minutes:
# the per-step limits below sum to 600 s):
#
#     bash bench/gpu_check.sh [OUT.json]      # default: bench/results/gpu_check.json
#
#   1. engine equality on CUDA: nf4 base on the GPU, a staggered mixed batch against peft
#      alone on the same GPU, fp32 and bf16 adapter stacks, eager and with `cuda_graphs`;
#      graph replays against the same padded step run eagerly, through KV pool growth and a
#      reallocated adapter stack (tests/runtime/engine/test_engine_cuda.py)
#   2. the Triton kernels compiled, against the Semantics loop and the torch strategy
#      (tests/runtime/lora/kernels/, which run under the interpreter on CPU elsewhere)
#   3. bench.lora_ops on the GPU: decode step, nf4 base (bf16 compute), bf16 stacks, torch
#      vs Triton kernels, against the base step and peft's mixed batch
#   4. bench.decode_graphs on the GPU: the engine's decode step eager, padded, and as CUDA
#      graphs (batches 1, 8, 32), capture time and the memory the graphs hold
#   5. bench.serve --quick on the GPU (loraplex vs one-at-a-time peft)
# and writes one JSON: each step's exit code, seconds and test counts, and the figures.
# Exit 0 only if every step passed. Without CUDA it prints one line and exits 2.
# PY=/path/to/python overrides the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${1:-bench/results/gpu_check.json}"

why=$("$PY" -c 'import torch; print("" if torch.cuda.is_available() else "no CUDA device visible to torch " + torch.__version__)' 2>&1 | tail -1)
if [ -n "$why" ]; then
    echo "gpu_check: $why; nothing was measured" >&2
    exit 2
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"
STEPS=()

step() {  # step NAME LIMIT_S CMD...: run with a time limit, keep rc, seconds and log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "gpu_check: $name ..." >&2
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$rc $((SECONDS - t0))" >"$WORK/$name.rc"
    [ "$rc" -eq 0 ] || { echo "gpu_check: $name failed (rc $rc); last lines:" >&2; tail -5 "$WORK/$name.log" >&2; }
    STEPS+=("$name")
}

step engine_cuda 180 "$PY" -m pytest -q -p no:cacheprovider -m cuda -s \
    tests/runtime/engine/test_engine_cuda.py --junitxml="$WORK/engine_cuda.xml"
step kernels 90 "$PY" -m pytest -q -p no:cacheprovider tests/runtime/lora/kernels \
    --junitxml="$WORK/kernels.xml"
step lora_ops 120 "$PY" -m bench.lora_ops --device cuda --quantization nf4 \
    --stacks bfloat16 --kernels torch,triton --quick --part adapters --out "$WORK/lora_ops.json"
step decode_graphs 90 "$PY" -m bench.decode_graphs --device cuda --quick \
    --out "$WORK/decode_graphs.json"
step serve 120 "$PY" -m bench.serve --quick --device cuda --json

"$PY" - "$WORK" "$OUT" "${STEPS[@]}" <<'PYEOF'
import json, sys, platform, xml.etree.ElementTree as ET
from pathlib import Path
import torch
work, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "cuda": torch.version.cuda, "platform": platform.platform(), "steps": {}}
try:
    import triton
    result["triton"] = triton.__version__
except ImportError:
    result["triton"] = None
for name in steps:
    rc, secs = (int(v) for v in (work / f"{name}.rc").read_text().split())
    entry = {"rc": rc, "seconds": secs, "passed": rc == 0}
    xml = work / f"{name}.xml"
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        entry["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    log = (work / f"{name}.log").read_text(errors="replace")
    entry["log_tail"] = log.splitlines()[-8:]
    result["steps"][name] = entry
for name in ("lora_ops", "decode_graphs"):
    figures = work / f"{name}.json"
    if figures.is_file():
        result[name] = json.loads(figures.read_text())
serve_log = work / "serve.log"
if result["steps"].get("serve", {}).get("passed"):
    lines = [ln for ln in serve_log.read_text().splitlines() if ln.startswith("{")]
    result["serve"] = json.loads(lines[-1]) if lines else None
result["passed"] = all(s["passed"] for s in result["steps"].values())
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"gpu_check: {'passed' if result['passed'] else 'FAILED'}; figures in {out}")
sys.exit(0 if result["passed"] else 1)
PYEOF
