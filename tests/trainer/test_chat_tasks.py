"""The real-base demo tasks: held-out rows are unseen, and every answer has its tenant's
shape, decided by the input (pure Python, milliseconds)."""

import json
import re

from loraplex.trainer.chat_tasks import GENERATORS, make_split, write_tasks
from loraplex.trainer.data import load_jsonl


def test_held_out_prompts_never_appear_in_training_and_answers_are_deterministic():
    for tenant in GENERATORS:
        train, test = make_split(tenant, n_train=160, n_test=30)
        assert len(train) == 160 and len(test) == 30
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
        assert make_split(tenant, n_train=160, n_test=30) == (train, test)


def test_each_tenant_answers_in_its_own_shape_taken_from_the_input():
    _, acme = make_split("acme", n_train=10, n_test=40)
    assert {r["completion"] for r in acme} == {"BILLING", "SHIPPING", "TECH", "ACCOUNT"}
    _, globex = make_split("globex", n_train=10, n_test=40)
    for r in globex:
        fields = json.loads(r["completion"])
        assert list(fields) == ["order", "item", "action"]
        assert fields["order"] in r["prompt"] and fields["item"] in r["prompt"]
        assert fields["action"] in ("refund", "replace", "cancel")
    _, initech = make_split("initech", n_train=10, n_test=40)
    for r in initech:
        m = re.fullmatch(r"(fix|feat|perf)\((android|ios|web|windows|macos)\): (.+)",
                         r["completion"])
        assert m and m.group(3) in r["prompt"]


def test_written_files_are_chat_rows_the_trainer_accepts(tmp_path):
    paths = write_tasks(tmp_path, n_train=20, n_test=5)
    for tenant, p in paths.items():
        ds = load_jsonl(p["train"])
        assert ds.format == "messages" and len(ds.examples) == 20, tenant
        assert len(load_jsonl(p["test"]).examples) == 5
    assert (tmp_path / "train.yaml").is_file()
