"""Ref parsing: every valid form round-trips; every malformed one names its problem."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.errors import InvalidArgument
from loraplex.registry.refs import AdapterRef, parse_key, parse_ref

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
versions = st.integers(min_value=1, max_value=10**12)
digests = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)

refs = st.one_of(
    st.builds(lambda t, n: f"{t}/{n}", names, names),
    st.builds(lambda t, n, a: f"{t}/{n}@{a}", names, names, names),
    st.builds(lambda t, n, v: f"{t}/{n}:v{v}", names, names, versions),
    st.builds(lambda h: f"sha256:{h}", digests),
)


@settings(max_examples=300, deadline=None)
@given(refs)
def test_valid_refs_round_trip(text: str) -> None:
    ref = parse_ref(text)
    assert str(ref) == text
    assert parse_ref(str(ref)) == ref


@settings(max_examples=200, deadline=None)
@given(names, names, versions)
def test_parts_land_in_the_right_fields(tenant: str, name: str, version: int) -> None:
    ref = parse_ref(f"{tenant}/{name}:v{version}")
    assert (ref.tenant, ref.name, ref.version, ref.alias, ref.digest) == (
        tenant, name, version, None, None)
    assert ref.key == f"{tenant}/{name}"
    assert parse_ref(f"{tenant}/{name}@{name}").alias == name


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        ref = parse_ref(text)
    except InvalidArgument as e:
        assert e.field == "ref"
        assert e.message
    else:
        assert isinstance(ref, AdapterRef)
        assert parse_ref(str(ref)) == ref
        # valid as sent: nothing trimmed or rewritten (a digest's hex is only case-folded)
        assert str(ref) == (text.lower() if text.startswith("sha256:") else text)


whitespace = st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u2003", min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(refs, whitespace, st.sampled_from(["lead", "trail", "both"]))
def test_valid_refs_with_surrounding_whitespace_are_refused(text: str, ws: str,
                                                             where: str) -> None:
    padded = (ws if where != "trail" else "") + text + (ws if where != "lead" else "")
    with pytest.raises(InvalidArgument, match="leading or trailing whitespace") as info:
        parse_ref(padded)
    assert info.value.field == "ref"
    with pytest.raises(InvalidArgument, match="whitespace"):
        parse_key(padded.replace(text, "acme/support"))


@settings(max_examples=200, deadline=None)
@given(names, st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ !#$%&*+,;<=>?[]^{|}~", min_size=1,
                      max_size=5))
def test_names_with_foreign_characters_are_refused(name: str, junk: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid"):
        parse_ref(f"acme/{name}{junk}x")


def test_uppercase_digest_is_normalised() -> None:
    h = "AB" * 32
    assert parse_ref(f"sha256:{h}").digest == f"sha256:{h.lower()}"


@pytest.mark.parametrize(("text", "problem"), [
    ("", "empty"),
    ("   ", "leading or trailing whitespace"),
    (" acme/support", "leading or trailing whitespace"),
    ("acme/support@prod\n", "leading or trailing whitespace"),
    ("acme/ support", "adapter name ' support' is invalid"),
    ("acme/support :v1", "whitespace"),
    ("acme", "exactly one '/'"),
    ("acme/support/x", "exactly one '/'"),
    ("/support", "tenant is empty"),
    ("acme/", "adapter name is empty"),
    ("Acme/support", "tenant 'Acme' is invalid"),
    ("acme/Support", "adapter name 'Support' is invalid"),
    ("acme/-support", "adapter name '-support' is invalid"),
    ("acme/" + "a" * 65, "is invalid"),
    ("acme/support@", "alias is empty"),
    ("acme/support@Prod", "alias 'Prod' is invalid"),
    ("acme/support:3", "version '3' is invalid"),
    ("acme/support:v0", "version 'v0' is invalid"),
    ("acme/support:v03", "version 'v03' is invalid"),
    ("acme/support:vx", "version 'vx' is invalid"),
    ("acme/support@prod:v3", "both an alias and a version"),
    ("sha256:abc", "64 hex digits"),
    ("sha256:" + "g" * 64, "non-hex"),
    ("sha512:" + "a" * 64, "unsupported digest 'sha512'"),
    ("acme:v3", "unsupported digest"),
])
def test_bad_refs_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=problem) as info:
        parse_ref(text)
    assert info.value.field == "ref"


def test_keys_refuse_aliases_and_versions() -> None:
    assert parse_key("acme/support") == ("acme", "support")
    for bad in ("acme/support@prod", "acme/support:v1", "acme"):
        with pytest.raises(InvalidArgument) as info:
            parse_key(bad)
        assert info.value.field == "name"


def test_errors_quote_a_short_prefix_of_a_huge_ref() -> None:
    for text in ("acme/" + "x" * 10_000, "x" * 10_000 + "/support", "acme/s@" + "p" * 10_000,
                 "acme/s:v" + "9" * 10_000, "sha256:" + "a" * 10_000, "md5:" + "a" * 10_000):
        with pytest.raises(InvalidArgument) as info:
            parse_ref(text)
        assert len(info.value.message) < 300, info.value.message
        assert "characters)" in info.value.message
