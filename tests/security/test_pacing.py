"""A caller whose calls keep being refused is slowed down (runtime/serve/pacing.py): its
refusals are sent later and its calls start later, so a loop on a refused call costs the
server one call per delay, not hundreds a second."""

from __future__ import annotations

import time

import grpc
import pytest

from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.pacing import WINDOW_S, RefusalPacer
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from loraplex.v1 import registry_pb2, registry_pb2_grpc


def test_refusals_past_the_free_ones_are_delayed_per_caller_within_the_window():
    pacer = RefusalPacer(free=3, delay_s=1.0)
    assert [pacer.delay_for("tenant:a", "INVALID_ARGUMENT", now=t) for t in range(4)] == \
        [0.0, 0.0, 0.0, 1.0]
    assert pacer.delay_for("tenant:b", "INVALID_ARGUMENT", now=4) == 0.0  # its own count
    assert pacer.delay_for("tenant:a", "NOT_FOUND", now=4) == 0.0  # not a refusal in a loop
    assert pacer.delay_for("tenant:a", "OK", now=4) == 0.0
    assert pacer.delay_for("tenant:a", "RESOURCE_EXHAUSTED", now=4) == 1.0
    later = 4 + WINDOW_S + 1  # the window has passed: free again
    assert pacer.delay_for("tenant:a", "UNAUTHENTICATED", now=later) == 0.0
    assert RefusalPacer(free=0).delay_for("x", "INVALID_ARGUMENT", now=0) == 0.0  # off


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacing")
    reg = Registry.open(root / "reg")
    settings = load_settings({"base": micro_base, "registry": str(root / "reg"), "port": 0,
                              "host": "127.0.0.1", "metrics_port": None,
                              "refusal_pacing_free": 3, "refusal_pacing_delay_s": 0.5})
    tokens = {t: reg.create_token(Identity.system(), t) for t in ("acme", "globex", "initech")}
    with BackgroundServer(settings, registry=reg, with_engine=False) as bg, \
            grpc.insecure_channel(bg.target) as channel:
        yield {"stub": registry_pb2_grpc.RegistryServiceStub(channel), "tokens": tokens,
               "pacer": bg.server.pacer}


def _refused(world, tenant: str) -> float:
    """Seconds until one INVALID_ARGUMENT (a malformed ref) comes back."""
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        world["stub"].GetAdapter(registry_pb2.GetAdapterRequest(ref="not a ref"), metadata=[
            ("authorization", f"Bearer {world['tokens'][tenant]}")], timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return time.monotonic() - start


def test_a_tenant_looping_on_refused_calls_is_answered_later(world):
    pacer = world["pacer"]
    before = pacer.paced
    for _ in range(3):
        _refused(world, "acme")
    assert pacer.paced == before  # the free ones
    assert min(_refused(world, "acme") for _ in range(2)) >= 0.5
    assert pacer.paced == before + 3  # two refusals held, and the second call's start
    _refused(world, "globex")  # another tenant keeps its own count
    assert pacer.paced == before + 3
    paced = pacer.paced
    world["stub"].ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=[
        ("authorization", f"Bearer {world['tokens']['initech']}")], timeout=30)
    assert pacer.paced == paced  # a tenant within its budget is never delayed


def test_a_tenant_over_its_refusal_budget_waits_before_each_call(world):
    pacer = world["pacer"]
    for _ in range(5):  # over the budget of 3
        _refused(world, "globex")
    assert pacer.over_budget("tenant:globex") and not pacer.over_budget("tenant:nobody")
    start = time.monotonic()
    served = world["stub"].ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=[
        ("authorization", f"Bearer {world['tokens']['globex']}")], timeout=30)
    assert list(served.adapters) == [] and time.monotonic() - start >= 0.5
