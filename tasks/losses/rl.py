"""The math of online RL on token rewards: advantages (GAE, RLOO) and the clipped PPO losses. Pure tensor functions
over right-padded [B, T] batches whose ``mask`` is 1 on response tokens (a response is a prefix of its row).

- GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"):
      delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = sum_l (gamma * lam)^l delta_{t+l},    R_t = A_t + V_t
  with V = 0 after the last response token (the episode ends there).
- PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"), per token, averaged over response tokens:
      L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),    rho_t = exp(logp_t - logp_old_t)
      L_V  = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)
- RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs"; Kool et al. 2019) with per-token returns: for sample i of k for one prompt,
      G^i_t = sum_{s >= t} r^i_s,    A^i_t = G^i_t - 1/(k-1) sum_{j != i} G^j_t     (G^j_t = 0 past j's end)
  The baseline is the other samples' return from the same position: it never depends on sample i, so the
  gradient stays unbiased, and with dense rewards (ABC) it tracks how much reward is left at step t. With a
  sparse reward every G_t is the sequence reward and this is the usual sequence-level RLOO.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); ``shift_mean=False`` keeps the mean."""
    mean = masked_mean(values, mask)
    n = mask.sum().clamp(min=2)
    variance = (((values - mean) ** 2) * mask).sum() / (n - 1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both [B, T] and zero off the mask."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = sum_{s >= t} r_s (gamma = 1), zero off the mask."""
    rewards = rewards * mask
    return (rewards.flip(1).cumsum(1).flip(1)) * mask


def _leave_one_out(grouped: torch.Tensor, k: int) -> torch.Tensor:
    """Each row of a prompt's group minus the mean of the group's other k - 1 rows (dim 1 is the group)."""
    return grouped - (grouped.sum(1, keepdim=True) - grouped) / (k - 1)


def _check_groups(rewards: torch.Tensor, k: int) -> None:
    if k < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (rl.samples_per_prompt >= 2)")
    if rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rows are not groups of k = {k}")


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs"), sequence-level as in TRL's RLOOTrainer. Sample i's return is R_i = sum_t r_{i,t}; its
    advantage A_i = R_i - mean_{j != i} R_j (the other samples of its prompt) is put on every one of its tokens.
    Rows are grouped by prompt, ``k`` consecutive rows per prompt."""
    _check_groups(rewards, k)
    returns = (rewards * mask).sum(1).view(-1, k)
    return _leave_one_out(returns, k).view(-1, 1) * mask


def rloo_token_advantages(rewards: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per-position leave-one-out (``algorithm: rloo_token``): the return-to-go G_{i,t} = sum_{s>=t} r_{i,s} minus
    the mean of the other samples' G_{j,t} at the same position (0 past their end). A token's advantage depends on
    the rewards after it, so dense token credit is not averaged over the sequence. It is not sequence-level RLOO,
    even under a sparse reward when lengths differ: for k = 2, reward 1 at the end of both, lengths 10 and 5, the
    long sample's positions 5..9 get +1, where :func:`rloo_advantages` gives 0 everywhere."""
    _check_groups(rewards, k)
    returns = returns_to_go(rewards, mask)
    return _leave_one_out(returns.view(-1, k, returns.shape[1]), k).view_as(returns) * mask


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped surrogate loss, share of tokens where clipping was active)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clipped value loss, share of tokens where the clipped error was the larger)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    return loss, masked_mean((clipped_error > error).float(), mask)


class AdaptiveKL:
    """The KL coefficient controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon); fixed when ``target`` is None."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
