"""The shape every trainer shares (reward model, policy, RL).

A trainer builds its model, optimizer and scheduler in ``__init__`` and then calls :meth:`Trainer.resume`;
``train()`` runs to the end and returns the metric history; ``save_pretrained`` writes the model. Its resumable
checkpoint goes through one save and one resume (tasks/train/checkpoint.py), sharded under FSDP2. A subclass says
what makes a run this run (:meth:`identity`: a checkpoint of another run is refused) and what its progress is
(:meth:`progress_state`, :meth:`restore`).
"""

from __future__ import annotations

from typing import Any

import torch

from creditflow.tasks.train.checkpoint import Checkpoint, resume_training_state, save_training_state


class Trainer:
    checkpoint: Checkpoint | None = None
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sharded_model: torch.nn.Module | None = None  # under FSDP2: the module whose shards DCP writes

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def progress_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_checkpoint(self) -> None:
        state = (self.checkpoint, self.trainable, self.optimizer, self.scheduler, self.identity())
        save_training_state(*state, sharded_model=self.sharded_model, **self.progress_state())

    def resume(self) -> bool:
        """Continue from the checkpoint when there is one (weights, optimizer, scheduler, RNG, progress)."""
        if self.checkpoint is None or self.checkpoint.latest() is None:
            return False
        state = (self.checkpoint, self.trainable, self.optimizer, self.scheduler, self.identity())
        self.restore(resume_training_state(*state, sharded_model=self.sharded_model))
        return True
