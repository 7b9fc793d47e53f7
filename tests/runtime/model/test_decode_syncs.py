"""The decode path reads nothing back from the device except the sampled tokens.

On CUDA every `.item()`, `.tolist()`, `int(t)`/`bool(t)` of a device tensor and every
`torch.cuda.synchronize()` stalls the host until the GPU drains its queue. Without a GPU
this test counts those calls (mocked) during a real engine run on CPU and checks where they
come from: sampling (the one read a step needs) and the plan's slot bookkeeping, which works
on a host copy of Python lists by construction. A new read anywhere else fails it. The
padded static decode path (what `cuda_graphs` replays) is held to the same rule: its input
buffer is filled from host lists, in one copy to the device.
"""

from __future__ import annotations

import sys
import traceback
from collections import Counter

import pytest
import torch

from loraplex.registry import Identity
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import SPECS, make_world

# (file, function) allowed to read tensors to the host, and why
ALLOWED = {
    ("decoding/sampling.py", "sample_next"): "the sampled tokens: the step needs them on the host",
    ("decoding/sampling.py", "_sample_row"): "seeded sampling of one row (not used greedy)",
    ("lora/ops.py", "make_plan"): "host copy of the row slots (a Python list)",
    ("lora/ops.py", "_window"): "host copy of a bucket's token order (from make_plan's)",
    ("lora/batched.py", "plan_for"): "host copy of the row slots",
    ("lora/layers.py", "_slots"): "host copy of the row slots (validation)",
}
READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static"])
def test_a_decode_step_reads_back_only_the_sampled_tokens(micro_base, tmp_path, monkeypatch,
                                                          static_decode):
    world = make_world(micro_base, tmp_path, specs=SPECS[:2])  # two adapters are enough
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=2, max_rank=16, max_batch=8,
                                 static_decode=static_decode), world.registry).start()
    calls: Counter = Counter()
    syncs = []

    def counting(name, real):
        def read(self, *a, **k):
            frame = traceback.extract_stack(limit=2)[0]
            where = "/".join(frame.filename.rsplit("/", 2)[-2:])  # folder/file.py
            calls[(where, frame.name, name)] += 1
            return real(self, *a, **k)
        return read

    try:
        for name in READS:
            if hasattr(torch.Tensor, name):
                monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(a))
        streams = [engine.submit(engine.admit(
            f"r{i}", Identity("acme"), f"acme/{world.names[i % len(world.names)]}",
            prompt_ids=[5 + i, 7, 9], sampling=SamplingParams(max_new_tokens=5)))
            for i in range(4)]
        results = [s.wait(120) for s in streams]
        steps = engine.stats().steps
        decoder = engine._core.runner.static
    finally:
        monkeypatch.undo()
        engine.shutdown()
    assert sum(len(r.token_ids) for r in results) >= 8  # decode steps really ran
    if static_decode:
        assert decoder.stats.eager_steps > 4  # ... through the static path
    assert syncs == []
    ours = {k: v for k, v in calls.items() if "site-packages" not in k[0]}
    outside = {k: v for k, v in ours.items() if (k[0], k[1]) not in ALLOWED}
    assert outside == {}, f"device reads outside sampling/plan bookkeeping: {outside}"
    sampled = sum(v for (f, fn, _), v in ours.items() if f == "decoding/sampling.py")
    # one read per forward, the whole batch at once (a step runs a decode and a prefill)
    assert 0 < sampled <= 2 * steps
    print(f"\n{steps} steps: host reads by site {dict(ours)}", file=sys.stderr)
