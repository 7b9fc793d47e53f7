"""The learning-rate probe (`trainer/probe.py`) alone, on the micro base: the order it tries
the rates in, when it ends early, and what it leaves the adapter as."""

from __future__ import annotations


def test_the_probe_tries_the_highest_rate_first_and_stops_once_one_converges(micro_base,
                                                                            acme_data):
    """`probe_lr` alone: with a least gain of 0 nothing converges, and the rates down to the
    rule's are scored (the lower one too when the rule's did not halve the loss); with a
    least gain above any loss, only the first (highest) is. The adapter goes back to its
    initial values unless the winner is kept."""
    import torch

    from loraplex.trainer.config import TrainConfig
    from loraplex.trainer.data import load_jsonl, stop_ids
    from loraplex.trainer.model import load_base, wrap_lora
    from loraplex.trainer.probe import probe_lr
    from loraplex.trainer.recipe import needs_lower
    from loraplex.trainer.train import _encode

    cfg = TrainConfig(base=str(micro_base), data=str(acme_data), name="acme/p",
                      quantization="none", max_seq_len=64)
    model, tok = load_base(micro_base, cfg)
    model = wrap_lora(model, cfg.model_copy(update={"r": 8, "alpha": 16.0, "dropout": 0.0}))
    rows = _encode(tok, load_jsonl(acme_data).examples, cfg, "training", stop_ids(tok)).rows
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    kw = dict(batch_size=8, seed=0, pad_id=tok.pad_token_id, planned=60, say=lambda s: None)
    every = probe_lr(model, rows[:32], rows[32:], lr=1e-3, gain=0.0, **kw)
    scores, start = every.record["val_loss"], every.record["start_loss"]
    lower = needs_lower(scores[1e-3], start)  # the rule's rate did not halve the loss
    assert list(scores) == [3e-3, 1e-3] + ([3.3e-4] if lower else [])
    assert every.record["not_tried"] == ([] if lower else [3.3e-4]) and every.optimizer is None
    assert not every.record["converged"] and every.record["continued"] == 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n
    first = probe_lr(model, rows[:32], rows[32:], lr=1e-3, gain=1e3, keep_winner=True, **kw)
    assert list(first.record["val_loss"]) == [3e-3] and first.record["chosen"] == 3e-3
    assert first.record["converged"] and first.optimizer is not None
    assert first.optimizer.param_groups[0]["lr"] == 3e-3
