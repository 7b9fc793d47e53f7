"""The early stop (`trainer/stopping.py`) on literal validation curves, with a real optimizer
and scheduler: converged, a gain, a stall that cuts the rate once, a second stall that stops."""

from __future__ import annotations

import torch
from transformers import TrainerControl, TrainerState
from transformers.optimization import get_cosine_schedule_with_warmup

from loraplex.trainer.stopping import RATE_CUT, EarlyStop


def _feed(stop: EarlyStop, losses: list[float], sched, opt) -> list[int]:
    """Evaluate `losses` at steps 6, 12, …; the steps where the run was told to stop."""
    stopped = []
    for i, loss in enumerate(losses):
        state, control = TrainerState(), TrainerControl()
        state.global_step = 6 * (i + 1)
        stop.on_evaluate(None, state, control, metrics={"eval_loss": loss},
                         lr_scheduler=sched, optimizer=opt)
        if control.should_training_stop:
            stopped.append(state.global_step)
    return stopped


def _optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=3e-3)
    return opt, get_cosine_schedule_with_warmup(opt, 0, 100)


def test_a_stall_cuts_the_rate_once_and_the_next_stall_stops():
    opt, sched = _optimizer()
    stop = EarlyStop(patience=3, gain=1e-3)
    # best 0.021 at step 12; 3 points without a gain -> cut at 30; 0.004 is a gain (step 36);
    # three more points without one -> stop at 54
    losses = [0.036, 0.021, 0.035, 0.023, 0.072, 0.004, 0.0045, 0.0039, 0.005]
    assert _feed(stop, losses, sched, opt) == [54]
    assert stop.cut_at == [30]
    assert sched.base_lrs == [3e-3 * RATE_CUT] and opt.param_groups[0]["lr"] == 3e-3 * RATE_CUT
    assert stop.reason.startswith("stalled at step 54") and "rate cut at step 30" in stop.reason


def test_a_loss_below_the_least_gain_stops_at_once():
    opt, sched = _optimizer()
    stop = EarlyStop(patience=3, gain=2e-3)
    assert _feed(stop, [0.0122, 0.00175, 0.001], sched, opt) == [12, 18]
    assert stop.cut_at == [] and stop.reason.startswith("converged at step")


def test_drops_smaller_than_the_least_gain_do_not_count():
    opt, sched = _optimizer()
    stop = EarlyStop(patience=2, gain=1e-2, cuts=0)  # no cut: the stall stops the run
    assert _feed(stop, [0.50, 0.495, 0.491], sched, opt) == [18]
    assert sched.base_lrs == [3e-3]


def test_the_count_and_the_cuts_survive_a_checkpoint():
    """What `Trainer` saves and rebuilds on --resume (`ExportableState`)."""
    opt, sched = _optimizer()
    stop = EarlyStop(patience=3, gain=1e-3)
    _feed(stop, [0.036, 0.021, 0.035, 0.023, 0.072, 0.030], sched, opt)
    saved = stop.state()
    again = EarlyStop(**saved["args"])
    for k, v in saved["attributes"].items():
        setattr(again, k, v)
    assert (again.best, again.waited, again.cut_at) == (0.021, 1, [30])
