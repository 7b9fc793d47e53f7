"""Sampling values, per-request generators; the engine's incremental text and stop strings
(`Detokenizer`) on the embedded tokenizer."""

from __future__ import annotations

import pytest
import torch

from loraplex.basemodel import build_tokenizer
from loraplex.errors import InvalidArgument
from loraplex.runtime.api.types import SamplingParams
from loraplex.runtime.decoding.detokenize import Detokenizer, TokenTable
from loraplex.runtime.decoding.sampling import (
    filter_logits,
    make_generator,
    sample_next,
    validate_sampling,
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("params, field", [
    (SamplingParams(max_new_tokens=0), "sampling.max_new_tokens"),
    (SamplingParams(max_new_tokens=65), "sampling.max_new_tokens"),
    (SamplingParams(temperature=-0.1), "sampling.temperature"),
    (SamplingParams(temperature=float("nan")), "sampling.temperature"),
    (SamplingParams(top_k=-1), "sampling.top_k"),
    (SamplingParams(top_p=0.0), "sampling.top_p"),
    (SamplingParams(top_p=1.5), "sampling.top_p"),
    (SamplingParams(seed=-3), "sampling.seed"),
    (SamplingParams(stop=("",)), "sampling.stop"),
    (SamplingParams(stop=tuple(str(i) for i in range(17))), "sampling.stop"),
])
def test_out_of_range_values_name_their_field(params, field):
    with pytest.raises(InvalidArgument) as e:
        validate_sampling(params, max_new_tokens_limit=64)
    assert e.value.field == field


def test_valid_values_pass_and_lists_become_tuples():
    p = SamplingParams(max_new_tokens=64, temperature=0.7, top_k=5, top_p=0.5, seed=1,
                       stop=["x"])
    validate_sampling(p, max_new_tokens_limit=64)
    assert p.stop == ("x",)


def test_top_k_and_top_p_keep_only_the_head():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])  # [V]
    p = filter_logits(logits, 1.0, top_k=2, top_p=1.0)
    assert (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = filter_logits(logits, 1.0, top_k=0, top_p=0.5)
    # softmax: 0.64, 0.24, ...: the top token alone already holds 0.5 of the mass
    assert p[0] == 1.0 and (p[1:] == 0).all()
    p = filter_logits(logits, 1.0, top_k=0, top_p=0.8)
    assert (p[:2] > 0).all() and (p[2:] == 0).all()


def test_greedy_rows_take_the_argmax_and_seeded_rows_reproduce():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # [B, V]
    greedy = SamplingParams()
    hot = SamplingParams(temperature=1.0, seed=11)
    runs = [sample_next(logits, [greedy, hot, hot],
                        [None, make_generator(hot), make_generator(hot)]) for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][0] == int(logits[0].argmax())
    draws = {tuple(sample_next(logits[1:2].expand(1, -1), [hot], [g]))
             for g in [make_generator(SamplingParams(temperature=1.0, seed=s)) for s in range(20)]}
    assert len(draws) > 1
    assert make_generator(greedy) is None


def test_detokenizer_holds_back_a_stop_string_split_over_tokens(tok):
    ids = tok("hello END world", add_special_tokens=False)["input_ids"]
    tail = Detokenizer(TokenTable.for_tokenizer(tok), stop=("END",))
    out = "".join(tail.feed([i]) for i in ids)
    assert tail.stopped and out == "hello " and tail.text == "hello "
    assert tail.feed([65]) == ""  # nothing after a stop


def test_detokenizer_without_stop_emits_everything(tok):
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    tail = Detokenizer(TokenTable.for_tokenizer(tok), stop=("zz",))
    pieces = [tail.feed([i]) for i in ids]
    assert pieces == ["a", "b", "c"]  # nothing here can start "zz": no hold-back
    assert tail.finish() == ""


def test_detokenizer_holds_back_only_a_possible_stop_start(tok):
    tail = Detokenizer(TokenTable.for_tokenizer(tok), stop=("END",))
    out = [tail.feed(tok(c, add_special_tokens=False)["input_ids"]) for c in "aEN"]
    assert out == ["a", "", ""]  # "E", then "EN" could become "END"
    assert tail.feed(tok("x", add_special_tokens=False)["input_ids"]) == "ENx"
    assert not tail.stopped


def test_detokenizer_waits_for_complete_utf8(tok):
    ids = tok("é!", add_special_tokens=False)["input_ids"]  # 2 bytes + 1
    tail = Detokenizer(TokenTable.for_tokenizer(tok))
    assert tail.feed(ids[:1]) == ""  # half a character is never emitted
    assert tail.feed(ids[1:2]) == "é"
    assert tail.feed(ids[2:]) == "!"


def test_stop_that_appears_as_a_prefix_of_a_longer_candidate(tok):
    ids = tok("a<|x", add_special_tokens=False)["input_ids"]
    tail = Detokenizer(TokenTable.for_tokenizer(tok), stop=("<|end|>", "|x"))
    out = "".join(tail.feed([i]) for i in ids)
    assert tail.stopped and out == "a<"
