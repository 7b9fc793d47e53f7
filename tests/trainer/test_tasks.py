import json

import pytest

from loraplex.trainer.tasks import (
    DESKS,
    SENTIMENT,
    TENANTS,
    make_split,
    number_to_words,
    write_tasks,
)


@pytest.mark.parametrize("n, words", [
    (0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (42, "forty-two"),
    (100, "one hundred"), (101, "one hundred one"), (347, "three hundred forty-seven"),
    (1000, "one thousand"), (9999, "nine thousand nine hundred ninety-nine"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_splits_are_deterministic_and_held_out():
    for tenant in TENANTS:
        train, test = make_split(tenant, seed=0, n_train=200, n_test=30)
        again, test_again = make_split(tenant, seed=0, n_train=200, n_test=30)
        assert train == again and test == test_again
        assert not {e["prompt"] for e in train} & {e["prompt"] for e in test}
        assert make_split(tenant, seed=1, n_train=200, n_test=30)[0] != train


def test_each_task_answers_from_the_prompt():
    acme = make_split("acme", n_train=40, n_test=1)[0]
    globex = make_split("globex", n_train=40, n_test=1)[0]
    initech = make_split("initech", n_train=5, n_test=1)[0]
    for e in acme:  # exactly one desk keyword decides the desk
        hits = [d for d, kws in DESKS.items() for w in e["prompt"].split() if w in kws]
        assert hits == [e["completion"]]
    for e in globex:
        hits = [s for s, kws in SENTIMENT.items() for w in e["prompt"].split() if w in kws]
        assert hits == ([] if e["completion"] == "neutral" else [e["completion"]])
    assert all(e["prompt"].split()[-1] in DESKS[e["completion"]] for e in acme)
    assert {e["completion"] for e in acme} == set(DESKS)
    assert {e["completion"] for e in globex} == {"positive", "negative", "neutral"}
    assert all(e["completion"] == number_to_words(int(e["prompt"])) for e in initech)


def test_write_tasks_writes_jsonl_per_tenant(tmp_path):
    paths = write_tasks(tmp_path, n_train=10, n_test=3)
    assert sorted(paths) == sorted(TENANTS)
    for p in paths.values():
        rows = [json.loads(x) for x in p["train"].read_text().splitlines()]
        assert len(rows) == 10 and set(rows[0]) == {"messages"}  # chat rows
        assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]
        assert len(p["test"].read_text().splitlines()) == 3
