"""Constrained decoding in the engine (micro base, fp32, real peft adapters): constrained and
free rows of two adapters and the base share one batch; constrained outputs parse and
validate against their schema, free rows equal peft alone token for token."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loraplex.basemodel import EOS_ID
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity
from loraplex.runtime.api.observer import EngineObserver
from loraplex.runtime.engine.engine import Engine, EngineConfig, SamplingParams
from tests.runtime.world import SPECS, make_world, reference_greedy

ACME = Identity("acme")
# bounded so that even a random-weight model closes it well within max_new_tokens
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}}}
MAX_NEW = 80  # PERSON is at most ~70 bytes even with escaped characters


class Counting(EngineObserver):
    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.compiles: list[float] = []

    def on_grammar_cache(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def on_grammar_compile(self, seconds: float) -> None:
        self.compiles.append(seconds)


@pytest.fixture(scope="module")
def setup(micro_base, tmp_path_factory):
    world = make_world(micro_base, tmp_path_factory.mktemp("structured"), specs=SPECS[:2])
    observer = Counting()
    engine = Engine(EngineConfig(base_dir=micro_base, quantization="none", device="cpu",
                                 max_slots=2, max_rank=16, max_batch=16), world.registry,
                    observer).start()
    yield world, engine, observer
    engine.shutdown()


def _admit(engine, rid, adapter, prompt, **sampling):
    return engine.admit(rid, ACME, f"acme/{adapter}" if adapter else None, prompt=prompt,
                        sampling=SamplingParams(**sampling))


def test_constrained_and_free_rows_of_two_adapters_share_a_batch(setup):
    world, engine, observer = setup
    schema = json.dumps(PERSON)
    rows = [(f"{kind}-{adapter}", adapter, f"person {i}: ", kind)
            for i, adapter in enumerate(["a1", "a2", None])
            for kind in ("json", "free")]
    requests = [_admit(engine, rid, adapter, prompt, max_new_tokens=MAX_NEW if kind == "json"
                       else 12, **({"json_schema": schema} if kind == "json" else {}))
                for rid, adapter, prompt, kind in rows]
    steps0 = engine.stats().steps
    streams = [engine.submit(r) for r in requests]  # all admitted together (max_batch 16)
    results = {r.request_id: s.wait(120) for r, s in zip(requests, streams, strict=True)}
    steps = engine.stats().steps - steps0
    tokens = sum(len(r.token_ids) for r in results.values())
    assert steps < tokens / 2  # rows shared forwards
    texts = set()
    for rid, adapter, _prompt, kind in rows:
        got = results[rid]
        if kind == "json":
            assert got.finish_reason == "stop", (rid, got.text)
            jsonschema.validate(json.loads(got.text), PERSON)  # parses and validates
            texts.add(got.text)
        else:
            ids = requests[[r[0] for r in rows].index(rid)].prompt_ids
            assert got.token_ids == reference_greedy(world, adapter, list(ids), 12, eos=EOS_ID)
    assert len(texts) >= 2  # the adapters still steer what the grammar allows
    # one schema: compiled once, then served from the cache
    assert (observer.misses, observer.hits) == (1, 2) and len(observer.compiles) == 1


def test_regex_and_choice_end_on_a_complete_match(setup):
    _, engine, _ = setup
    pattern = r"[a-c]{3}-[0-9]{2}"
    choices = ("yes", "no", "maybe later")
    r1 = engine.generate(_admit(engine, "re", "a1", "code: ", regex=pattern,
                                max_new_tokens=32), 60)
    r2 = engine.generate(_admit(engine, "ch", "a2", "answer: ", choice=choices,
                                max_new_tokens=32), 60)
    assert re.fullmatch(pattern, r1.text) and r1.finish_reason == "stop"
    assert r2.text in choices and r2.finish_reason == "stop"
    assert len(r1.token_ids) == 6  # ended by the grammar, not by max_new_tokens


def test_too_few_tokens_to_close_the_json_end_with_length(setup):
    _, engine, _ = setup
    r = engine.generate(_admit(engine, "short", None, "person: ", max_new_tokens=4,
                               json_schema=json.dumps(PERSON)), 60)
    assert r.finish_reason == "length" and len(r.token_ids) == 4
    assert r.text.startswith('{"')  # a valid prefix the caller knows is incomplete
    with pytest.raises(ValueError):
        json.loads(r.text)


@pytest.mark.parametrize(("sampling", "field"), [
    ({"json_schema": "{not json"}, "sampling.json_schema"),
    ({"json_schema": json.dumps({"type": "strin"})}, "sampling.json_schema"),
    ({"regex": "(unclosed"}, "sampling.regex"),
    ({"choice": ("a", "")}, "sampling.choice"),
    ({"regex": "a", "choice": ("a",)}, "sampling.choice"),
])
def test_bad_constraints_name_the_field(setup, sampling, field):
    _, engine, _ = setup
    with pytest.raises(InvalidArgument) as e:
        _admit(engine, "bad", None, "x", **sampling)
    assert e.value.field == field


def test_a_token_the_grammar_refuses_ends_with_grammar(setup, micro_base):
    """The mask never samples such a token; if one is committed anyway (a bug, or a grammar
    that dead-ends), the request ends "grammar" at once instead of emitting garbage."""
    from transformers import AutoTokenizer

    from loraplex.runtime.decoding.detokenize import Detokenizer, TokenTable
    from loraplex.runtime.engine.commit import Seq, take_token

    _, engine, _ = setup
    req = _admit(engine, "dead", None, "x", regex="[0-9]+", max_new_tokens=8)
    tok = AutoTokenizer.from_pretrained(micro_base)
    s = Seq(request=req, stream=None, detok=Detokenizer(TokenTable.for_tokenizer(tok)),
            generator=None, t_submit=0.0,
            grammar=req.grammar.start())
    digit, letter = tok.encode("7", add_special_tokens=False)[0], \
        tok.encode("z", add_special_tokens=False)[0]
    assert take_token(s, digit, frozenset({EOS_ID}), 512).finish is None
    assert take_token(s, letter, frozenset({EOS_ID}), 512).finish == "grammar"


def test_unpack_bits_reads_token_t_from_bit_t_mod_32_of_word_t_div_32():
    import torch

    from loraplex.runtime.decoding.grammar import unpack_bits

    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    got = unpack_bits(words, 100)  # [3, 100]
    want = [[bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(100)]
            for r in range(3)]
    assert got.tolist() == want
