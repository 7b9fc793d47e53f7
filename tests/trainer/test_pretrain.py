import hashlib

from loraplex.basemodel import build_base
from loraplex.trainer.pretrain import corpus_example, pretrain_base


def _digest(p):
    return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()


def test_pretrained_micro_builds_are_byte_identical_and_differ_from_raw(tmp_path):
    a = build_base(tmp_path / "a", size="micro", seed=0, pretrain=pretrain_base)
    b = build_base(tmp_path / "b", size="micro", seed=0, pretrain=pretrain_base)
    raw = build_base(tmp_path / "raw", size="micro", seed=0)
    assert _digest(a) == _digest(b) != _digest(raw)


def test_corpus_is_seeded_and_covers_every_skill():
    import random

    xs = [corpus_example(random.Random(7)) for _ in range(1)]
    assert xs == [corpus_example(random.Random(7))]
    rng = random.Random(0)
    prompts = [corpus_example(rng)[0] for _ in range(400)]
    for kind in ("upper: ", "reverse: ", "spell: "):
        assert any(p.startswith(kind) for p in prompts), kind
    assert any(":" not in p for p in prompts)  # plain echo, the default behaviour
