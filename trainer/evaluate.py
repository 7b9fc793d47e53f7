"""Loss and exact-match of greedy completions: the numbers that say an adapter works.

Both metrics see each row exactly as training does (`data.encode_example`,
`data.prompt_ids`): a prompt/completion row as written, a chat row in the base's chat
template with loss on every assistant turn. Exact-match compares the greedy completion of
the prompt (a chat row: the turns before its last reply) up to a stop token (EOS or the
generation config's end-of-turn ids) or `max_new_tokens` with the reference, surrounding
whitespace ignored. Batched with left padding; generation is the slow part, so callers cap the number
of examples where they only need an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from loraplex.trainer.data import Example, encode_example, pad_batch, prompt_ids, stop_ids


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per completion token
    exact_match: float  # fraction of examples whose greedy completion equals the reference
    n: int
    predictions: list[str]

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": round(self.loss, 6), "exact_match": round(self.exact_match, 6),
                "n": self.n}


def _device(model: Any):
    return next(model.parameters()).device


def completion_loss(model: Any, tokenizer: Any, examples: list[Example], *,
                    batch_size: int = 16, max_seq_len: int = 512) -> float:
    """Token-weighted mean loss over labelled tokens (what training minimises)."""
    import torch

    pad = tokenizer.pad_token_id
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))
    total, count = 0.0, 0
    dev = _device(model)
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            rows = []
            for ex in examples[i:i + batch_size]:
                enc = encode_example(tokenizer, ex, max_seq_len=max_seq_len, stop=stop)
                rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
            b = {k: v.to(dev) for k, v in pad_batch(rows, pad).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            shift_logits = logits[:, :-1].float()  # [B, T-1, V]
            shift_labels = b["labels"][:, 1:]  # [B, T-1]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((shift_labels != -100).sum())
    return total / count if count else math.nan


def greedy_completions(model: Any, tokenizer: Any, examples: list[Example], *,
                       max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy completion of each example's rendered prompt, decoded without specials."""
    import torch

    pad = tokenizer.pad_token_id
    dev = _device(model)
    stop = sorted(stop_ids(tokenizer, getattr(model, "generation_config", None)))
    outputs: list[str] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            prompts = [prompt_ids(tokenizer, ex) for ex in examples[i:i + batch_size]]
            n = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), n), pad, dtype=torch.long)  # [B, T] left-padded
            mask = torch.zeros((len(prompts), n), dtype=torch.long)  # [B, T]
            for j, p in enumerate(prompts):
                ids[j, n - len(p):] = torch.tensor(p)
                mask[j, n - len(p):] = 1
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=stop or None)
            for row in out[:, n:]:
                outputs.append(tokenizer.decode(row, skip_special_tokens=True))
    return outputs


def evaluate(model: Any, tokenizer: Any, examples: list[Example], *,
             max_new_tokens: int = 64, batch_size: int = 16, max_seq_len: int = 512
             ) -> EvalResult:
    """Loss and exact-match of `model` on `examples` (model is put in eval mode)."""
    model.eval()
    loss = completion_loss(model, tokenizer, examples, batch_size=batch_size,
                           max_seq_len=max_seq_len)
    preds = greedy_completions(model, tokenizer, examples, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    hits = sum(p.strip() == ex.completion.strip() for p, ex in zip(preds, examples, strict=True))
    return EvalResult(loss=loss, exact_match=hits / len(examples) if examples else math.nan,
                      n=len(examples), predictions=preds)


def max_completion_tokens(tokenizer: Any, examples: list[Example], cap: int) -> int:
    """Enough new tokens for the longest reference (+EOS), at most `cap`: generation stops
    early on EOS anyway, but a tight bound keeps a babbling base from dominating run time."""
    longest = max(len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"])
                  for ex in examples)
    return max(1, min(cap, longest + 2))
