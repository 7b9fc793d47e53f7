"""Adapter references: the one place that turns what a caller writes into a typed ref.

    acme/support            -> the newest version (alias `latest`)
    acme/support@prod       -> whatever the alias `prod` points at
    acme/support:v3         -> version 3
    sha256:<64 hex>         -> the version with that content digest

Tenants, adapter names and aliases share one alphabet: `[a-z0-9][a-z0-9._-]{0,63}`.
Parsing is strict (no upper case, no `v03`, no surrounding whitespace: a ref is valid as
sent or refused, never quietly trimmed) so that `str(parse_ref(s)) == s` for every valid
`s` (a digest's hex is case-folded): a ref printed in a log can be pasted back verbatim.
Errors quote the caller's text through `errors.quote`, cut to a short prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loraplex.errors import InvalidArgument, quote

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
_NAME_RE = re.compile(NAME_PATTERN)
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_RE = re.compile(r"v([1-9][0-9]{0,17})")
LATEST = "latest"
DIGEST_PREFIX = "sha256:"


def check_name(value: str, what: str, *, field: str = "ref") -> str:
    """Return `value` if it is a valid tenant/adapter/alias name, else raise naming `what`."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} is empty", field=field)
    if not _NAME_RE.fullmatch(value):
        raise InvalidArgument(
            f"{what} {quote(value)} is invalid: use 1-64 characters of [a-z0-9._-], "
            "starting with a letter or digit", field=field)
    return value


def check_digest(value: str, *, field: str = "ref") -> str:
    """Normalise `sha256:<hex>` (hex case-folded) or raise a precise InvalidArgument."""
    if not value.startswith(DIGEST_PREFIX):
        raise InvalidArgument(f"digest {quote(value)} must start with 'sha256:'", field=field)
    hexpart = value[len(DIGEST_PREFIX):].lower()
    if len(hexpart) != 64:
        raise InvalidArgument(
            f"digest {quote(value)} must have 64 hex digits after 'sha256:', got {len(hexpart)}",
            field=field)
    if not _HEX64_RE.fullmatch(hexpart):
        raise InvalidArgument(f"digest {quote(value)} has non-hex characters", field=field)
    return DIGEST_PREFIX + hexpart


@dataclass(frozen=True)
class AdapterRef:
    """A parsed ref. Exactly one of (digest) or (tenant, name) is set; `alias` and
    `version` are mutually exclusive and both None means `latest`."""

    tenant: str | None = None
    name: str | None = None
    alias: str | None = None
    version: int | None = None
    digest: str | None = None

    @property
    def key(self) -> str:
        """`tenant/name`; only for name refs."""
        if self.tenant is None or self.name is None:
            raise InvalidArgument(f"{self} names no adapter", field="ref")
        return f"{self.tenant}/{self.name}"

    def __str__(self) -> str:
        if self.digest is not None:
            return self.digest
        base = f"{self.tenant}/{self.name}"
        if self.version is not None:
            return f"{base}:v{self.version}"
        if self.alias is not None:
            return f"{base}@{self.alias}"
        return base


def parse_key(text: str, *, field: str = "name") -> tuple[str, str]:
    """Parse `tenant/name` (no alias, no version): the name an adapter is pushed under."""
    if not isinstance(text, str):
        raise InvalidArgument(f"adapter name must be a string, got {type(text).__name__}",
                              field=field)
    _refuse_whitespace(text, "adapter name", field)
    if "@" in text or ":" in text:
        raise InvalidArgument(
            f"{quote(text)}: expected 'tenant/name' without an alias or version", field=field)
    parts = text.split("/")
    if len(parts) != 2:
        raise InvalidArgument(f"{quote(text)}: expected 'tenant/name' (exactly one '/')",
                              field=field)
    return (check_name(parts[0], "tenant", field=field),
            check_name(parts[1], "adapter name", field=field))


def parse_ref(text: str | AdapterRef) -> AdapterRef:
    """Parse any ref form; raise InvalidArgument(field="ref") naming the problem."""
    if isinstance(text, AdapterRef):
        return text
    if not isinstance(text, str):
        raise InvalidArgument(f"ref must be a string, got {type(text).__name__}", field="ref")
    if not text:
        raise InvalidArgument("ref is empty", field="ref")
    _refuse_whitespace(text, "ref", "ref")
    if text.startswith(DIGEST_PREFIX):
        return AdapterRef(digest=check_digest(text))
    algo, colon, _ = text.partition(":")
    if colon and "/" not in algo and "@" not in algo:
        raise InvalidArgument(f"ref {quote(text)}: unsupported digest {quote(algo)}; write "
                              "'sha256:<64 hex>' or 'tenant/name[:vN|@alias]'", field="ref")
    if "@" in text and ":" in text:
        raise InvalidArgument(f"ref {quote(text)} has both an alias and a version; use one",
                              field="ref")
    head, alias, version = text, None, None
    if "@" in text:
        head, _, alias_text = text.partition("@")
        alias = check_name(alias_text, "alias")
    elif ":" in text:
        head, _, version_text = text.partition(":")
        version = _parse_version(version_text)
    tenant, name = parse_key(head, field="ref")
    return AdapterRef(tenant=tenant, name=name, alias=alias, version=version)


def _parse_version(text: str) -> int:
    m = _VERSION_RE.fullmatch(text)
    if not m:
        raise InvalidArgument(
            f"version {quote(text)} is invalid: write 'v' and a number from 1 without leading "
            "zeros, e.g. ':v3'", field="ref")
    return int(m.group(1))


def _refuse_whitespace(text: str, what: str, field: str) -> None:
    """A ref is valid as sent or refused: trimming would serve something other than what was
    sent. (Whitespace inside fails the name alphabet further on.)"""
    if text != text.strip():
        raise InvalidArgument(f"{what} {quote(text)} has leading or trailing whitespace",
                              field=field)
