"""Constrained decoding at the doors: gRPC `SamplingParams.json_schema/regex/choice` over a
real channel, and the OpenAI route's `response_format`, on one live server (micro base)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from test_grpc_inference import settings_for  # same folder (rootdir mode)

from loraplex.client import Client
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity, Registry
from loraplex.runtime.openai_binding import EngineBackend, HttpThread
from loraplex.runtime.openai_http import create_app
from loraplex.runtime.server import BackgroundServer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "n"],
          "properties": {"city": {"type": "string", "maxLength": 5},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


@pytest.fixture(scope="module")
def world(micro_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-edges")
    reg = Registry.open(root / "reg")
    token = reg.create_token(Identity.system(), "acme")
    with BackgroundServer(settings_for(micro_base, root), registry=reg) as bg:
        backend = EngineBackend(bg.server.state.engine, reg, base_name="micro")
        with HttpThread(create_app(backend)) as http, \
                Client(bg.target, token=token, timeout=60) as client:
            oa = openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key=token,
                               max_retries=0, timeout=60)
            yield {"client": client, "oa": oa, "backend": backend}


def test_grpc_constraints_and_the_invalid_schema_error(world):
    c = world["client"]
    out = c.generate(None, "where: ", max_new_tokens=64, json_schema=SCHEMA)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert c.generate(None, "pick: ", max_new_tokens=16, choice=["red", "green"]).text \
        in ("red", "green")
    with pytest.raises(InvalidArgument) as e:
        c.generate(None, "x", json_schema='{"type": "object", "properties": 3}')
    assert e.value.field == "sampling.json_schema"
    with pytest.raises(InvalidArgument) as e:
        c.generate(None, "x", regex="[z-a]")
    assert e.value.field == "sampling.regex"


def test_openai_response_format_json_schema_and_json_object(world):
    oa = world["oa"]
    msgs = [{"role": "user", "content": "where?"}]
    res = oa.chat.completions.create(
        model="micro", messages=msgs, max_tokens=64, temperature=0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "place", "schema": SCHEMA}})
    assert res.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(res.choices[0].message.content), SCHEMA)
    # the same greedy request over gRPC answers the same text
    rendered = world["backend"].render(msgs)
    assert world["client"].generate(None, rendered, max_new_tokens=64,
                                    json_schema=SCHEMA).text == res.choices[0].message.content
    obj = oa.completions.create(model="micro", prompt="json: ", max_tokens=120, temperature=0,
                                extra_body={"response_format": {"type": "json_object"}})
    if obj.choices[0].finish_reason == "stop":  # an unbounded object may run to max_tokens
        assert isinstance(json.loads(obj.choices[0].text), dict)
    else:
        assert obj.choices[0].text.startswith("{")
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="micro", messages=msgs, max_tokens=4,
                                   response_format={"type": "json_schema", "json_schema": {}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
