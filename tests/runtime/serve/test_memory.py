"""Freed heap memory goes back to the operating system (runtime/serve/memory.py): what a
burst of large requests left behind is returned, so RSS follows what the server holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraplex.runtime.serve import memory

# In a fresh interpreter: 3 MiB buffers interleaved with small live ones (so the freed space
# is not at the heap's top, which glibc returns by itself), freed, then one trim.
PROBE = """
import json
from loraplex.runtime.serve.memory import MemoryTrimmer, rss_bytes
import time
del bytearray(4 << 20)[:]  # one large block: glibc's mmap threshold rises past 3 MiB
big, small = [], []
for _ in range(60):
    big.append(b"x" * (3 << 20))  # written: its pages are resident
    small.append(b"y" * 2000)
full = rss_bytes()
del big
freed = rss_bytes()
trimmer = MemoryTrimmer(interval_s=60).start()
trimmer.request()
deadline = time.monotonic() + 20
while trimmer.trims == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
trimmer.stop()
print(json.dumps({"full": full, "freed": freed, "trimmed": rss_bytes(),
                  "trims": trimmer.trims}))
"""


@pytest.mark.skipif(memory._glibc() is None, reason="malloc_trim is glibc's")
def test_a_trim_returns_what_a_burst_of_large_buffers_left_resident():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=120, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    burst = 60 * (3 << 20)
    assert r["full"] - r["trimmed"] > burst // 2, r  # most of the 180 MiB is gone
    assert r["trims"] == 1


def test_arena_cap_and_trim_are_harmless_calls():
    assert memory.trim() >= 0
    assert memory.rss_bytes() > 0
    assert memory.limit_arenas(0) is False  # 0: glibc's own default, nothing applied


def test_refused_large_requests_are_not_kept_until_a_full_collection(micro_base, tmp_path):
    """A refused call's request (here 4 MiB refs) is freed when the call ends, not left in
    a reference cycle for the cyclic garbage collector, which runs full collections
    rarely in a server with torch loaded (collection is off here to show it)."""
    import gc

    import grpc

    from loraplex.registry import Identity, Registry
    from loraplex.runtime.serve.server import BackgroundServer
    from loraplex.runtime.serve.settings import load_settings
    from loraplex.v1 import registry_pb2, registry_pb2_grpc

    reg = Registry.open(tmp_path / "reg")
    token = reg.create_token(Identity.system(), "acme")
    settings = load_settings({"base": micro_base, "registry": str(tmp_path / "reg"),
                              "port": 0, "host": "127.0.0.1", "metrics_port": None,
                              "refusal_pacing_free": 0, "memory_trim_s": 0})
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg, \
            grpc.insecure_channel(bg.target) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        big = "a" * (4 << 20)
        gc.collect()
        gc.disable()
        try:
            memory.trim()
            before = memory.rss_bytes()
            for _ in range(REFUSED):
                with pytest.raises(grpc.RpcError) as e:
                    stub.GetAdapter(registry_pb2.GetAdapterRequest(ref=big), timeout=30,
                                    metadata=[("authorization", f"Bearer {token}")])
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            memory.trim()
            grown = memory.rss_bytes() - before
        finally:
            gc.enable()
    # kept requests would hold at least REFUSED x 4 MiB (240 MiB); a third of that leaves
    # room for the allocator's own noise (51 MiB was seen once with nothing kept)
    assert grown < REFUSED * (4 << 20) // 3, (
        f"{grown >> 20} MiB kept after {REFUSED} refused 4 MiB requests")


REFUSED = 60
