"""Intake at the edge: a caller's ref and prompt become a `GenerationRequest`.

    request = engine.intake.admit("r1", identity, "acme/support@prod", prompt="Hello",
                                     sampling=SamplingParams(32))   # or engine.admit(...)
    stream = engine.submit(request)

`admit` resolves the ref in the registry (authorization included: a foreign tenant's adapter
is NotFound), checks the version fits this engine's base and limits, and tokenizes the
prompt: text as written, or chat `messages` rendered with the base's own chat template
(`loraplex.chat.render`, the trainer's rendering; the engine then also stops at the
template's end-of-turn ids, which `Runner` reads from the base's generation config). It
reads the database and takes the tokenizer lock, so the gRPC servicers call it in
a worker thread (`asyncio.to_thread`), never on the event loop; the engine itself receives
only the resolved version and token ids. Refs are resolved once, here: new requests see an
alias move at once, admitted ones finish on the version (digest) they were given.

`validate_request` is the cheap, pure check `Engine.submit` runs on whatever it is handed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loraplex import chat
from loraplex.errors import (
    InvalidArgument,
    NotFound,
    quote,
)
from loraplex.runtime.api.limits import Limits, check_compatible
from loraplex.runtime.api.types import GenerationRequest, SamplingParams
from loraplex.runtime.decoding.sampling import validate_sampling
from loraplex.runtime.engine.ratelimit import RateLimiter

if TYPE_CHECKING:
    from loraplex.registry import AdapterVersion, Identity, Registry
    from loraplex.runtime.decoding.grammar import GrammarCompiler


class LockedTokenizer:
    """The tokenizer behind one lock: the intake encodes on callers' threads while the engine
    thread decodes, and a fast tokenizer must not be borrowed mutably meanwhile."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer
        self._lock = threading.Lock()

    def __call__(self, text: str, **kw: Any) -> Any:
        with self._lock:
            return self.inner(text, **kw)

    def encode_ids(self, text: str) -> list[int]:
        with self._lock:
            return list(self.inner(text)["input_ids"])

    def decode(self, ids: list[int], **kw: Any) -> str:
        with self._lock:
            return self.inner.decode(ids, **kw)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Intake:
    """Ref + prompt → `GenerationRequest` (see the module docstring). Thread-safe."""

    def __init__(self, registry: Registry | None, tokenizer: LockedTokenizer,
                 limits: Limits, grammars: GrammarCompiler | None = None,
                 rates: RateLimiter | None = None) -> None:
        self.registry = registry
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammars = grammars
        self.rates = rates or RateLimiter(None, None)

    def admit(self, request_id: str, identity: Identity, adapter: str | None = None,
              prompt: str | None = None, prompt_ids: Sequence[int] | None = None,
              sampling: SamplingParams | None = None, deadline: float | None = None,
              messages: Sequence[dict[str, str]] | None = None) -> GenerationRequest:
        """Exactly one of `prompt`, `prompt_ids`, `messages` ([{"role", "content"}]).
        Raises InvalidArgument (field named), NotFound / IncompatibleAdapter /
        FailedPrecondition (adapter)."""
        tenant = getattr(identity, "tenant", None)
        if tenant is None:
            raise InvalidArgument("`identity` is required", field="identity")
        sampling = sampling if sampling is not None else SamplingParams()
        given = [n for n, v in (("prompt", prompt), ("prompt_ids", prompt_ids),
                                ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise InvalidArgument("give exactly one of `prompt`, `prompt_ids` and `messages`",
                                  field=given[0] if given else "prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidArgument("`prompt` must be a string", field="prompt")
        self.rates.request(tenant)  # before any tokenizing: over its rate costs nothing more
        if prompt is not None:
            check_prompt_bytes([prompt], "prompt", self.limits)
            ids = self.tokenizer.encode_ids(prompt) if prompt else []
            check_prompt(ids, "prompt", self.limits)
        elif messages is not None:
            ids = self.chat_ids(messages)
        else:
            ids = list(prompt_ids)
        request = GenerationRequest(request_id, tenant, None, ids, sampling, deadline)
        validate_request(request, self.limits)  # before the registry: cheap problems first
        self.rates.tokens(tenant, len(ids) + int(sampling.max_new_tokens))
        version = self.resolve(identity, adapter) if adapter else None
        return self.with_grammar(GenerationRequest(request_id, tenant, version, ids, sampling,
                                                   deadline))

    def with_grammar(self, request: GenerationRequest) -> GenerationRequest:
        """`request` with its constraint compiled (cached per schema; a new one may take
        milliseconds, so on this caller's thread, never the engine's). InvalidArgument
        naming `sampling.json_schema` / `.regex` / `.choice` when it does not compile."""
        if request.grammar is not None or not request.sampling.constrained:
            return request
        if self.grammars is None:
            raise InvalidArgument("this engine does not support constrained decoding",
                                  field="sampling")
        return replace(request, grammar=self.grammars.compile(request.sampling))

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """`messages` checked (roles), rendered with the base's chat template and tokenized."""
        clean = chat.check_messages(messages)
        check_prompt_bytes([m["content"] for m in clean], "messages", self.limits)
        ids = chat.render_ids(self.tokenizer, clean)
        check_prompt(ids, "messages", self.limits)
        return ids

    def resolve(self, identity: Identity, ref: str) -> AdapterVersion:
        """The version `ref` names for `identity`, checked against this engine."""
        if self.registry is None:
            raise NotFound(f"adapter {quote(ref)}: this engine has no registry", field="adapter")
        version = self.registry.resolve(identity, ref)  # NotFound, InvalidArgument
        check_compatible(version, self.limits)
        return version


def validate_request(request: GenerationRequest, limits: Limits) -> None:
    """Raise a typed error naming the field for the first problem of `request`."""
    rid = request.request_id
    if not isinstance(rid, str) or not rid or len(rid) > 256:
        raise InvalidArgument("`request_id` must be a non-empty string of at most 256 "
                              "characters", field="request_id")
    if not isinstance(request.tenant, str) or not request.tenant:
        raise InvalidArgument("`tenant` is required", field="identity")
    ids = request.prompt_ids
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < limits.vocab_size
           for i in ids):
        raise InvalidArgument(f"`prompt_ids` must be token ids in [0, {limits.vocab_size})",
                              field="prompt_ids")
    check_prompt(ids, "prompt_ids", limits)
    validate_sampling(request.sampling, max_new_tokens_limit=limits.max_new_tokens)
    if request.deadline is not None and (isinstance(request.deadline, bool) or
                                         not isinstance(request.deadline, int | float)):
        raise InvalidArgument("`deadline` must be time.monotonic() seconds", field="deadline")
    if request.adapter is not None:
        check_compatible(request.adapter, limits)


def check_prompt_bytes(texts: Sequence[str], name: str, limits: Limits) -> None:
    """Refuse text longer than `limits.prompt_bytes` (UTF-8) before it is tokenized: the
    tokenizer's time grows with the text, under one lock every caller shares."""
    cap = limits.prompt_bytes
    chars = sum(len(t) for t in texts)
    size = chars if chars > cap else sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    if size > cap:
        raise InvalidArgument(f"`{name}` is {'at least ' if chars > cap else ''}{size} bytes; "
                              f"this server tokenizes at most {cap}", field=name)


def check_prompt(ids: Sequence[int], name: str, limits: Limits) -> None:
    if not ids:
        raise InvalidArgument(f"`{name}` is empty", field=name)
    if len(ids) >= limits.max_seq_len:
        raise InvalidArgument(f"`{name}` has {len(ids)} tokens; the context holds "
                              f"{limits.max_seq_len} including at least one generated token",
                              field=name)
