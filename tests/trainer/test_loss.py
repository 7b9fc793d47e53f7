"""The gathered completion loss is the model's own loss, with the same gradients."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.trainer.data import IGNORE_INDEX
from loraplex.trainer.loss import completion_loss_sum, gathered_head


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 12), generator=g)  # [B, T]
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:] = ids[0, 6:]  # completions of different lengths
    labels[1, 3:8] = ids[1, 3:8]
    labels[2, 5:9] = ids[2, 5:9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_gathered_loss_and_grads_equal_the_models_own(base_factory, arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_factory("micro", arch), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             init_lora_weights=False))
    assert gathered_head(model) is not None, "the shortcut should apply to this architecture"
    b = _batch(model.config.vocab_size)

    own = model(**b).loss  # the model's mean over labelled next tokens
    own.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    total, count = completion_loss_sum(model, b["input_ids"], b["attention_mask"], b["labels"])
    (total / count).backward()
    assert int(count) == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total / count, own, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_scaled_logits_keep_the_models_own_head(base_factory):
    model = AutoModelForCausalLM.from_pretrained(base_factory("micro", "llama"))
    model.config.final_logit_softcapping = 30.0  # as Gemma's heads do
    assert gathered_head(model) is None
