"""The Ray Serve application (a local Ray on 127.0.0.1): the gRPC ingress deployment in front
of two engine replicas, deployed as `loraplex serve --ray` and KubeRay's RayService do.

Same answers as one server token for token, tenant rules intact at the ingress, and a
replica killed mid-traffic: Ray starts a new one and the callers' retries succeed.
"""

from __future__ import annotations

import random
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import pytest

from loraplex.client import Client
from loraplex.errors import FailedPrecondition, NotFound, Unauthenticated, Unavailable
from loraplex.fingerprint import fingerprint_base
from loraplex.registry import Identity, Registry
from loraplex.runtime.fleet.ray_serve import APP, DEPLOYMENT, start
from loraplex.runtime.serve.server import BackgroundServer
from loraplex.runtime.serve.settings import load_settings
from tests.registry.conftest import adapter_files, write_adapter

pytestmark = pytest.mark.slow
PROMPTS = ("Where is my order?", "hello there", "one two three four")
ADAPTERS = {"acme": "acme/support@prod", "globex": "globex/sales@prod"}


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("ray")
    reg = Registry.open(root / "reg")
    system = Identity.system()
    reg.register_base(system, micro_base)
    fp = fingerprint_base(micro_base)
    for seed, ref in enumerate(ADAPTERS.values()):
        key = ref.split("@")[0]
        d = write_adapter(root / key.replace("/", "_"), *adapter_files(
            fp.linear_shapes, seed=seed, base_name=str(micro_base)))
        v = reg.push(system, d, key, base=fp)
        reg.set_alias(system, v.ref, "prod")
    tokens = {t: reg.create_token(system, t) for t in ADAPTERS}
    tokens["admin"] = reg.create_token(system, "ops", admin=True)
    common = {"base": micro_base, "registry": str(root / "reg"), "host": "127.0.0.1",
              "metrics_port": 0, "metrics_host": "127.0.0.1", "quantization": "none",
              "device": "cpu", "max_batch": 4, "max_slots": 2, "follow_poll_s": 1.0,
              "engine": {"compute_dtype": "float32"},
              "http_host": "127.0.0.1", "model_name": "micro"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port, http_port = _free_port(), _free_port()
    try:
        start(load_settings({**common, "port": port, "replicas": 2, "http_port": http_port}))
        with BackgroundServer(load_settings({**common, "port": 0, "http_port": 0})) as single:
            yield {"ingress": f"127.0.0.1:{port}", "single": single.target, "tokens": tokens,
                   "http": {"ingress": http_port, "single": single.http_port}}
    finally:
        ray.shutdown()  # ends Serve's controller and replicas with it (serve.shutdown is slow)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768 up) and above Ray's worker ports
    (10002-19999): Ray's own processes bind OS-assigned ephemeral ports while Serve starts,
    and one of them took a port picked from that range before the ingress could bind it."""
    rng = random.Random()
    for _ in range(200):
        candidate = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise RuntimeError("no free port in 20000-32000")


def _ask(target: str, token: str, ref: str | None, prompt: str, retries: int = 0,
         n: int = 12):
    with Client(target, token=token, timeout=60) as c:
        for attempt in range(retries + 1):
            try:
                return c.generate(ref, prompt, max_new_tokens=n)
            except Unavailable:
                if attempt == retries:
                    raise
                time.sleep(1.0)
    raise AssertionError("unreachable")


def _same_tokens_and_tenant_rules(world) -> None:
    ingress, single = world["ingress"], world["single"]
    for tenant, ref in ADAPTERS.items():
        token = world["tokens"][tenant]
        for prompt in PROMPTS:
            for r in (ref, None):
                a, b = _ask(ingress, token, r, prompt, 5), _ask(single, token, r, prompt)
                assert a.token_ids == b.token_ids and a.text == b.text
                assert a.adapter_ref == b.adapter_ref
    with pytest.raises(NotFound):  # acme cannot use globex's adapter, through Ray either
        _ask(ingress, world["tokens"]["acme"], ADAPTERS["globex"], "hi")
    with pytest.raises(Unauthenticated):
        _ask(ingress, "lpx_not-a-token", ADAPTERS["acme"], "hi")
    with Client(ingress, token=world["tokens"]["acme"], timeout=60) as c:
        streamed = [ch for ch in c.stream(ADAPTERS["acme"], PROMPTS[0], max_new_tokens=12)]
    expected = _ask(single, world["tokens"]["acme"], ADAPTERS["acme"], PROMPTS[0])
    assert [t for ch in streamed for t in ch.token_ids] == expected.token_ids
    _openai_door_like_one_server(world)
    with Client(ingress, token=world["tokens"]["admin"], timeout=60) as admin:
        with pytest.raises(FailedPrecondition):  # placement is Ray's, said so, not INTERNAL
            admin.prefetch(ADAPTERS["acme"])
        assert admin.stats().ready


def _openai_door_like_one_server(world) -> None:
    """`--http-port` on the Ray ingress: the OpenAI routes admit through the same RayEngine."""
    import openai

    def oa(door: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{world['http'][door]}/v1",
                             api_key=world["tokens"]["acme"], max_retries=0, timeout=60)

    ray_oa, ref = oa("ingress"), ADAPTERS["acme"]
    assert [m.id for m in ray_oa.models.list()] == ["micro", "acme/support"]
    texts = {door: oa(door).completions.create(model=ref, prompt=PROMPTS[0], max_tokens=8,
                                                temperature=0).choices[0].text
             for door in ("ingress", "single")}
    assert texts["ingress"] == texts["single"]
    chunks = ray_oa.completions.create(model=ref, prompt=PROMPTS[0], max_tokens=8,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == texts["single"]
    with pytest.raises(openai.NotFoundError):  # tenant rules over HTTP through Ray too
        ray_oa.completions.create(model=ADAPTERS["globex"], prompt="hi", max_tokens=2)


def _replica_actors() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#"))


def test_replicas_answer_like_one_server_and_survive_a_killed_replica(world) -> None:
    """One flow, so the checks run while Ray brings the replacement replica up."""
    import ray

    ingress, single = world["ingress"], world["single"]
    jobs = [(t, ADAPTERS[t], p) for t in ADAPTERS for p in PROMPTS] * 4
    expected = {(t, p): _ask(single, world["tokens"][t], ref, p, n=32).token_ids
                for t, ref, p in set(jobs)}
    before = _replica_actors()
    assert len(before) == 2
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_ask, ingress, world["tokens"][t], ref, p, 5, 32)
                   for t, ref, p in jobs]
        futures_wait(futures, timeout=30, return_when=FIRST_COMPLETED)  # traffic flows
        in_flight = sum(not f.done() for f in futures)
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        results = [f.result(timeout=120) for f in futures]
    assert in_flight >= 4, "the replica must die with requests in flight"
    for (t, _ref, p), r in zip(jobs, results, strict=True):
        assert r.token_ids == expected[(t, p)]
    _same_tokens_and_tenant_rules(world)
    deadline = time.monotonic() + 120
    while True:  # Ray Serve replaces the dead replica
        now = _replica_actors()
        if len(now) == 2 and before[0] not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
