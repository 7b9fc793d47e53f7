import hashlib
from pathlib import Path

import pytest

from loraplex.basemodel import build_base, build_tokenizer
from loraplex.errors import InvalidArgument
from loraplex.fingerprint import fingerprint_base


def _digest(p):
    return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_gives_byte_identical_weights(tmp_path):
    a = build_base(tmp_path / "a", size="micro", seed=3)
    b = build_base(tmp_path / "b", size="micro", seed=3)
    c = build_base(tmp_path / "c", size="micro", seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert fingerprint_base(a).digest == fingerprint_base(b).digest != fingerprint_base(c).digest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_built_base_loads_with_transformers_and_generates(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = build_base(tmp_path / arch, size="micro", arch=arch)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = tok("hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 3
    fp = fingerprint_base(d)
    assert fp.num_layers == 2 and fp.vocab_size == 259 and fp.linear_shapes


def test_tokenizer_round_trips_any_utf8():
    tok = build_tokenizer()
    text = "Grüße, 世界! 123"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_unknown_size_is_a_typed_error(tmp_path):
    with pytest.raises(InvalidArgument, match="size"):
        build_base(tmp_path / "x", size="huge")


# The application entry points assemble every package; the rest of the core is below them.
ENTRY_POINTS = {"cli.py", "demo.py", "demo_bases.py"}  # demo_bases: the demo's half


def test_core_does_not_import_the_trainer_or_the_runtime() -> None:
    """Dependencies point from the packages to the core (a core module importing the trainer,
    even lazily inside a function, once turned a missing trainer into a silent no-op)."""
    import ast

    core = Path(__file__).resolve().parents[2] / "loraplex"
    offenders = []
    for path in sorted(core.glob("*.py")):
        if path.name in ENTRY_POINTS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names
                          if n.startswith(("loraplex.trainer", "loraplex.runtime"))]
    assert not offenders
