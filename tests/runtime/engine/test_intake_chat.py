"""Chat messages and always-valid streamed text on the real SmolLM2-135M-Instruct base,
over a real gRPC channel (quantization "none", fp32, the base alone).

Chat: the server renders `messages` exactly as the trainer renders a chat row's prompt,
stops at the template's end-of-turn token, and names the field it refuses. Streaming:
byte-level BPE splits emoji and CJK characters across tokens; chunks must still carry only
whole characters, add up to the final text, and a stop string is cut exactly even when it
starts in the middle of a token.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loraplex.cli import app
from loraplex.client import AsyncClient, Client
from loraplex.errors import InvalidArgument
from loraplex.registry import Identity, Registry
from loraplex.runtime.api.limits import Limits
from loraplex.runtime.engine.intake import Intake, LockedTokenizer
from loraplex.runtime.serve.server import BackgroundServer
from tests.runtime.serve.test_grpc_inference import settings_for
from trainer.data import parse_line, prompt_ids

CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"}]
EMOJI = "Repeat exactly: 🙂🎉 你好世界 🙂🎉 你好世界"


@pytest.fixture(scope="module")
def tok(smollm2_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_base)


@pytest.fixture(scope="module")
def server(smollm2_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    reg = Registry.open(root / "reg")
    token = reg.create_token(Identity.system(), "acme")
    settings = settings_for(smollm2_base, root, max_batch=4,
                            engine={"compute_dtype": "float32", "max_seq_len": 256})
    with BackgroundServer(settings, registry=reg) as bg, \
            Client(bg.target, token=token, timeout=120) as client:
        bg.token = token
        yield {"bg": bg, "client": client}


def _admission(tokenizer) -> Intake:
    return Intake(None, LockedTokenizer(tokenizer),
                     Limits(vocab_size=len(tokenizer), max_seq_len=512, max_new_tokens=64,
                            max_rank=8))


# -- admission (no engine) -------------------------------------------------------------------
def test_served_chat_prompt_is_the_trainers_rendering(tok):
    row = json.dumps({"messages": CHAT + [{"role": "assistant", "content": "Paris."}]})
    trained = prompt_ids(tok, parse_line(Path("d.jsonl"), 1, row))
    served = _admission(tok).admit("r", Identity.system(), messages=CHAT)
    assert served.prompt_ids == trained
    assert tok.decode(served.prompt_ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, field", [
    ([{"role": "tool", "content": "42"}], "messages[0].role"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}],
     "messages[1].role"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([], "messages"),
])
def test_bad_messages_name_the_field(tok, messages, field):
    with pytest.raises(InvalidArgument) as e:
        _admission(tok).admit("r", Identity.system(), messages=messages)
    assert e.value.field == field


def test_exactly_one_prompt_form_and_a_template_is_required(tok):
    adm = _admission(tok)
    with pytest.raises(InvalidArgument) as e:
        adm.admit("r", Identity.system(), prompt_ids=[1, 2], messages=CHAT)
    assert e.value.field == "prompt_ids"
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(InvalidArgument, match="no chat template") as e:
        _admission(bare).admit("r", Identity.system(), messages=CHAT)
    assert e.value.field == "messages"


# -- over gRPC on the real base --------------------------------------------------------------
def test_chat_stops_at_end_of_turn_and_cuts_stop_strings_mid_token(server, tok):
    """One batch (its items decode together): chat messages, the trainer's rendering of the
    same chat sent as ids, a stop string that starts inside a token, an unknown role."""
    trained = prompt_ids(tok, parse_line(Path("d.jsonl"), 1, json.dumps(
        {"messages": CHAT + [{"role": "assistant", "content": "x"}]})))
    out = server["client"].batch_generate([
        dict(messages=CHAT, max_new_tokens=10), dict(prompt_ids=trained, max_new_tokens=10),
        dict(messages=CHAT, max_new_tokens=10, stop=["apit"]),
        dict(messages=[{"role": "robot", "content": "x"}])])
    chat, ids, cut, bad = out
    assert "Paris" in chat.text and chat.token_ids == ids.token_ids
    im_end = tok.convert_tokens_to_ids("<|im_end|>")  # the generation config's eos list
    assert chat.finish_reason == "stop" and im_end not in chat.token_ids
    assert chat.prompt_tokens == len(trained)
    at = chat.text.find("apit")
    assert at > 0 and at not in _token_ends(tok, chat.token_ids)  # mid-token
    assert (cut.text, cut.finish_reason) == (chat.text[:at], "stop")
    assert isinstance(bad, InvalidArgument) and bad.field == "items[3].messages[0].role"
    with pytest.raises(InvalidArgument) as e:
        server["client"].generate(None, "hi", messages=CHAT)
    assert e.value.field == "messages"

    res = CliRunner().invoke(app, ["generate", "--chat", "--system", CHAT[0]["content"],
                                   CHAT[1]["content"], "--max-new-tokens", "3",
                                   "--target", server["bg"].target,
                                   "--token", server["bg"].token])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == tok.decode(chat.token_ids[:3])  # same turns

    async def via_async_client():
        async with AsyncClient(server["bg"].target, token=server["bg"].token,
                               timeout=120) as client:
            return await client.generate(None, messages=CHAT, max_new_tokens=3)

    assert asyncio.run(via_async_client()).token_ids == chat.token_ids[:3]


def test_streamed_emoji_and_cjk_are_whole_characters(server, tok):
    chunks = list(server["client"].stream(None, messages=[{"role": "user", "content": EMOJI}],
                                          max_new_tokens=10))
    final = chunks[-1].final
    pieces = [_bytes_of(p) for p in tok.convert_ids_to_tokens(final.token_ids)]
    assert any(not _valid_utf8(p) for p in pieces), \
        f"no character was split across tokens: {final.text!r}"
    texts = [c.text for c in chunks]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == final.text and any(ord(ch) > 0x2FFF for ch in final.text)
    # a chunk ends only where a character ends: each chunk is whole characters by itself
    assert all(t.encode().decode() == t for t in texts)


def _token_ends(tok, ids: list[int]) -> set[int]:
    """Character offsets at which a token of `ids` ends (where the decoded text is whole)."""
    ends, acc = set(), b""
    for p in tok.convert_ids_to_tokens(ids):
        acc += _bytes_of(p)
        if _valid_utf8(acc):
            ends.add(len(acc.decode()))
    return ends


def _bytes_of(piece: str) -> bytes:
    """A byte-level BPE token's bytes (GPT-2's printable stand-ins mapped back)."""
    from loraplex.basemodel import byte_decoder

    dec = byte_decoder()
    return bytes(dec[c] for c in piece)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_generation_config_end_of_turn_ids_stop_beside_eos(micro_base, tmp_path):
    """A base whose generation config lists an end-of-turn id that is not the tokenizer's
    EOS (Llama 3's <|eot_id|> style): the engine stops there too, leaving it out."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from loraplex.runtime.api.types import EngineConfig, SamplingParams
    from loraplex.runtime.engine.engine import Engine

    base = Path(shutil.copytree(micro_base, tmp_path / "base"))
    tok = AutoTokenizer.from_pretrained(base)
    req = _admission(tok).admit("r", Identity.system(), messages=CHAT[1:])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = list(req.prompt_ids)
    with torch.no_grad():  # greedy reference, full forwards
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    ref = ids[len(req.prompt_ids):]
    k = next(i for i in range(1, 6) if ref[i] not in ref[:i] and ref[i] != tok.eos_token_id)
    GenerationConfig(eos_token_id=[tok.eos_token_id, ref[k]]).save_pretrained(base)
    engine = Engine(EngineConfig(base_dir=base, quantization="none", device="cpu",
                                 compute_dtype="float32", max_seq_len=64, max_batch=1)).start()
    try:
        res = engine.generate(engine.admit("r2", Identity.system(), messages=CHAT[1:],
                                           sampling=SamplingParams(max_new_tokens=6)), 60)
    finally:
        engine.shutdown()
    assert (res.token_ids, res.finish_reason) == (ref[:k], "stop")
