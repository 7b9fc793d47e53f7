"""The training loss, computed only where it counts.

A chat or prompt/completion row is mostly prompt: its labels are `IGNORE_INDEX` everywhere
but the completion. A causal LM's own loss still projects every position onto the whole
vocabulary (SmolLM2: 576 -> 49,152, about a fifth of the step's FLOPs at these sequence
lengths) and upcasts that `[B, T, V]` tensor to fp32 before throwing most of it away. Here the
decoder's hidden states are gathered at the labelled positions first, and only those rows go
through the output projection: the same loss (token-weighted cross-entropy over the shifted
labels), a smaller matmul and no `[B, T, V]` tensor.

The shortcut is exact only for heads whose logits are `lm_head(h)`: architectures that scale
or soft-cap logits (Gemma, Cohere, ...) keep the model's own loss (`gathered_head`).
"""

from __future__ import annotations

from typing import Any

from loraplex.trainer.data import IGNORE_INDEX

# model_type values whose causal-LM logits are exactly `get_output_embeddings()(hidden)`
PLAIN_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo",
                         "olmo2", "starcoder2"})


def gathered_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output projection) of a causal LM (a peft model is unwrapped: its LoRA
    layers live inside the decoder), or None where the shortcut is not exact."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEADS:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def completion_loss_sum(model: Any, input_ids: Any, attention_mask: Any, labels: Any
                        ) -> tuple[Any, Any]:
    """(summed cross-entropy over the labelled next-token positions, their count), both 0-d
    tensors; the count is the denominator of the model's own mean loss."""
    import torch

    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = targets != IGNORE_INDEX  # [B, T-1]
    parts = gathered_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
        picked = logits[:, :-1][keep]  # [N, V]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         use_cache=False).last_hidden_state  # [B, T, H]
        picked = head(hidden[:, :-1][keep])  # [N, V]
    loss = torch.nn.functional.cross_entropy(picked.float(), targets[keep], reduction="sum")
    return loss, keep.sum()


def completion_trainer(**kwargs: Any) -> Any:
    """A `transformers.Trainer` whose loss is `completion_loss_sum`, normalised the way the
    Trainer normalises a model's own loss: by the batch's labelled-token count across
    gradient-accumulation steps (and processes) where the Trainer counted it, else by this
    micro-batch's own count (the Trainer then divides by the accumulation steps)."""
    return _trainer_class()(**kwargs)


def _trainer_class() -> type:
    global _TRAINER
    if _TRAINER is None:
        from transformers import Trainer

        class CompletionLossTrainer(Trainer):
            def compute_loss(self, model: Any, inputs: dict[str, Any],
                             return_outputs: bool = False,
                             num_items_in_batch: Any = None) -> Any:
                total, count = completion_loss_sum(model, inputs["input_ids"],
                                                   inputs["attention_mask"], inputs["labels"])
                if num_items_in_batch is None:
                    loss = total / count.clamp(min=1)
                else:
                    loss = total / num_items_in_batch
                    if self.args.average_tokens_across_devices:
                        loss = loss * self.accelerator.num_processes
                return (loss, {"loss": loss}) if return_outputs else loss

        _TRAINER = CompletionLossTrainer
    return _TRAINER


_TRAINER: type | None = None
