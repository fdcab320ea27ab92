"""PACED's training callback: pass rates estimated when training starts, and refreshed on schedule."""

from __future__ import annotations

import weakref

from transformers import TrainerCallback


class PassRateCallback(TrainerCallback):
    """
    Estimates pass rates when training starts (unless restored from a checkpoint) and refreshes them on schedule.

    `trainer` is any object with a `pass_rate_table` and an `estimate_pass_rates()` (held weakly: the trainer owns
    the callback).
    """

    def __init__(self, trainer):
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if not trainer.pass_rate_table.is_estimated:
            trainer.estimate_pass_rates()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if (
            args.pass_rate_mode == "refresh"
            and state.global_step % args.pass_rate_refresh_steps == 0
            and state.global_step < state.max_steps
        ):
            trainer.estimate_pass_rates()
