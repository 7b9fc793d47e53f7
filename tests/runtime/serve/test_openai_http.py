"""The OpenAI-compatible routes, called with the official `openai` client against a live
HTTP server that shares its engine with a live gRPC server (micro base, fp32, real registry):
the same greedy request answers the same text over both doors."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import jsonschema
import openai
import pytest

from loraplex.client import Client
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity, Registry
from loraplex.runtime.serve.openai.binding import EngineBackend, HttpThread
from loraplex.runtime.serve.openai.http import create_app
from loraplex.runtime.serve.server import BackgroundServer
from tests.runtime.serve.test_grpc_inference import make_peft_adapter, settings_for

PROMPT = "the red box"


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-http")
    reg = Registry.open(root / "reg")
    tokens = {t: reg.create_token(Identity.system(), t) for t in ("acme", "globex")}
    with BackgroundServer(settings_for(micro_base, root), registry=reg) as bg:
        for seed, (tenant, name) in enumerate([("acme", "support"), ("globex", "sales")]):
            with Client(bg.target, token=tokens[tenant], timeout=60) as c:
                c.register_adapter(f"{tenant}/{name}",
                                   make_peft_adapter(micro_base, root / name, seed=seed))
                c.set_alias(f"{tenant}/{name}:v1", "prod")
        backend = EngineBackend(bg.server.state.engine, reg, base_name="micro")
        with HttpThread(create_app(backend)) as http:
            def oa(tenant: str, token: str | None = None) -> openai.OpenAI:
                return openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1",
                                     api_key=token or tokens[tenant], max_retries=0,
                                     timeout=60)
            yield {"bg": bg, "tokens": tokens, "oa": oa, "backend": backend}


def _grpc(world, tenant, adapter, prompt, **kw):
    with Client(world["bg"].target, token=world["tokens"][tenant], timeout=60) as c:
        return c.generate(adapter, prompt, **kw)


def test_models_lists_the_base_and_only_the_callers_adapters(world):
    ids = [m.id for m in world["oa"]("acme").models.list()]
    assert ids == ["micro", "acme/support"]


def _get_models(world, **params) -> tuple[int, dict]:
    """GET /v1/models?params as acme, by hand: (status, JSON body)."""
    url = f"{world['oa']('acme').base_url}models?{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, headers={
        "Authorization": f"Bearer {world['tokens']['acme']}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - a local server
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_models_pages_with_limit_and_after(world):
    pages, after = [], None
    while True:
        status, page = _get_models(world, limit=1, **({"after": after} if after else {}))
        assert status == 200
        pages.append([m["id"] for m in page["data"]])
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == pages[-1][-1]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [["micro"], ["acme/support"]]
    _, whole = _get_models(world)  # what the openai client's models.list() reads
    assert [m["id"] for m in whole["data"]] == ["micro", "acme/support"]
    assert whole["has_more"] is False
    for bad in ({"limit": 0}, {"limit": "many"}, {"limit": 1001}, {"after": "no such id"}):
        status, body = _get_models(world, **bad)
        assert status == 400 and body["error"]["param"] in ("limit", "after")


def test_completions_match_grpc_unary_and_streaming(world):
    client = world["oa"]("acme")
    res = client.completions.create(model="acme/support@prod", prompt=PROMPT, max_tokens=8,
                                    temperature=0)
    want = _grpc(world, "acme", "acme/support@prod", PROMPT, max_new_tokens=8)
    assert res.choices[0].text == want.text
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (
        len(PROMPT.encode()), len(want.token_ids))  # byte-level: one token per byte
    assert res.choices[0].finish_reason == ("length" if len(want.token_ids) == 8 else "stop")
    chunks = list(client.completions.create(model="acme/support@prod", prompt=PROMPT,
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == res.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == res.usage.completion_tokens


def test_chat_renders_the_base_chat_template(world):
    client = world["oa"]("acme")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    res = client.chat.completions.create(model="micro", messages=msgs, max_tokens=6,
                                         temperature=0)
    rendered = world["backend"].render(msgs)
    assert rendered == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    want = _grpc(world, "acme", "", rendered, max_new_tokens=6)
    assert res.choices[0].message.content == want.text
    assert res.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="micro", messages=msgs, max_tokens=6,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text


def test_stop_and_seed_are_honoured(world):
    client = world["oa"]("acme")
    full = client.completions.create(model="micro", prompt=PROMPT, max_tokens=12,
                                     temperature=0).choices[0].text
    stop = full[3:5]
    if stop:
        cut = client.completions.create(model="micro", prompt=PROMPT, max_tokens=12,
                                        temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model="micro", prompt=PROMPT, max_tokens=8,
                                      temperature=1.0, seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_errors_are_openai_bodies_with_the_grpc_status(world):
    with pytest.raises(openai.NotFoundError) as e:  # another tenant's adapter: NOT_FOUND
        world["oa"]("acme").completions.create(model="globex/sales@prod", prompt=PROMPT,
                                               max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "not_found"
    with pytest.raises(openai.AuthenticationError) as e:
        world["oa"]("acme", token="not-a-token").models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.BadRequestError) as e:
        world["oa"]("acme").chat.completions.create(
            model="micro", messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    assert e.value.body["param"] == "messages[0]"


# -- constrained decoding at both doors (runtime/decoding/grammar.py) -----------------------------------
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "n"],
          "properties": {"city": {"type": "string", "maxLength": 5},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


def test_grpc_constraints_and_the_invalid_schema_error(world):
    out = _grpc(world, "acme", "acme/support@prod", "where: ", max_new_tokens=64,
                json_schema=SCHEMA)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert _grpc(world, "acme", "", "pick: ", max_new_tokens=16,
                 choice=["red", "green"]).text in ("red", "green")
    with pytest.raises(InvalidArgument) as e:
        _grpc(world, "acme", "", "x", json_schema='{"type": "object", "properties": 3}')
    assert e.value.field == "sampling.json_schema"
    with pytest.raises(InvalidArgument) as e:
        _grpc(world, "acme", "", "x", regex="[z-a]")
    assert e.value.field == "sampling.regex"


def test_response_format_json_schema_and_json_object(world):
    oa = world["oa"]("acme")
    msgs = [{"role": "user", "content": "where?"}]
    res = oa.chat.completions.create(
        model="acme/support@prod", messages=msgs, max_tokens=64, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": SCHEMA}})
    assert res.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(res.choices[0].message.content), SCHEMA)
    # the same greedy request over gRPC answers the same text
    want = _grpc(world, "acme", "acme/support@prod", world["backend"].render(msgs),
                 max_new_tokens=64, json_schema=SCHEMA)
    assert want.text == res.choices[0].message.content
    obj = oa.completions.create(model="micro", prompt="json: ", max_tokens=40, temperature=0,
                                extra_body={"response_format": {"type": "json_object"}})
    if obj.choices[0].finish_reason == "stop":  # an unbounded object may run to max_tokens
        assert isinstance(json.loads(obj.choices[0].text), dict)
    else:
        assert obj.choices[0].text.startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="micro", messages=msgs, max_tokens=4,
                                   response_format={"type": "json_schema", "json_schema": {}})
    assert e.value.body["param"] == "response_format.json_schema.schema"


def test_a_grammar_dead_end_is_stop_with_the_engine_reason_beside_it(world, monkeypatch):
    """OpenAI's enum has no "grammar": the route says "stop" (not "length": a larger budget
    would not help) and keeps the engine's reason in `loraplex_finish_reason`; gRPC says
    FINISH_REASON_GRAMMAR. The mask never lets a grammar refuse a token, so the dead end is
    forced: every constrained token is refused (the engine thread reads the patched class)."""
    from loraplex.runtime.decoding.grammar import GrammarState

    monkeypatch.setattr(GrammarState, "advance", lambda self, token: False)
    oa = world["oa"]("acme")
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    msgs = [{"role": "user", "content": "where?"}]
    res = oa.chat.completions.create(model="micro", messages=msgs, max_tokens=16,
                                     temperature=0, response_format=fmt)
    choice = res.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["loraplex_finish_reason"] == "grammar"
    assert res.usage.completion_tokens == 1  # the refused token ends it at once
    chunks = list(oa.chat.completions.create(model="micro", messages=msgs, max_tokens=16,
                                             temperature=0, response_format=fmt, stream=True))
    last = chunks[-1].choices[0]
    assert (last.finish_reason, last.model_extra["loraplex_finish_reason"]) == ("stop", "grammar")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    free = oa.completions.create(model="micro", prompt=PROMPT, max_tokens=3, temperature=0)
    assert free.choices[0].model_extra["loraplex_finish_reason"] == free.choices[0].finish_reason
    assert _grpc(world, "acme", "", "x", max_new_tokens=4,
                 regex="[0-9]+").finish_reason == "grammar"


def test_regex_and_choice_through_vllm_structured_outputs(world):
    """vLLM's `structured_outputs` extra (`extra_body` in the official client) carries a
    regex or a choice list (or a schema as `json`); each answers what gRPC answers."""
    oa = world["oa"]("acme")
    pick = oa.completions.create(model="micro", prompt="pick: ", max_tokens=16, temperature=0,
                                 extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert pick.choices[0].text in ("red", "green") and pick.choices[0].finish_reason == "stop"
    code = oa.chat.completions.create(
        model="acme/support@prod", messages=[{"role": "user", "content": "code?"}],
        max_tokens=16, temperature=0,
        extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", code.choices[0].message.content)
    want = _grpc(world, "acme", "", "pick: ", max_new_tokens=16, choice=["red", "green"])
    assert pick.choices[0].text == want.text
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="micro", prompt="x", max_tokens=4,
                              extra_body={"structured_outputs": {"grammar": "start: x"}})
    assert e.value.body["param"] == "structured_outputs"
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model="micro", prompt="x", max_tokens=4,
                              extra_body={"structured_outputs": {"choice": "red"}})
    assert e.value.body["param"] == "structured_outputs.choice"
