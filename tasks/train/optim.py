"""Optimizer and schedule every trainer shares: AdamW parameter groups, warmup + cosine, step counts."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def adamw(named_parameters: dict[str, torch.nn.Parameter], learning_rate: float, weight_decay: float, device):
    """AdamW with no decay on norms and biases (parameters with fewer than 2 dims), as the HF Trainer does."""
    decay = [p for p in named_parameters.values() if p.ndim >= 2]
    rest = [p for p in named_parameters.values() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=learning_rate,
        fused=device.type == "cuda",
    )


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup length, rounded down: ``int(ratio * total)``."""
    return int(warmup_ratio * total_steps)


def cosine_schedule(optimizer, warmup: int, total_steps: int) -> LambdaLR:
    """Linear warmup to the peak learning rate, then cosine decay to 0. Unlike transformers'
    ``get_cosine_schedule_with_warmup`` the warmup starts at peak/(warmup + 1), not 0, so the first optimizer step
    updates the weights (written out, too, because importing that module imports peft: seconds per torchrun worker).
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)


def total_steps(micro_batches_per_epoch: int, micro_per_step: int, epochs: int, max_steps: int | None) -> int:
    total = math.ceil(micro_batches_per_epoch / micro_per_step) * epochs
    return min(total, max_steps) if max_steps is not None else total
