"""Step timing for the benchmarks that run a transformers Trainer (TRL's trainers)."""

from __future__ import annotations

import time


def trainer_step_times(ends: list[float]):
    """A TrainerCallback that appends ``time.perf_counter()`` when training begins and after every step."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    return StepTimes()
