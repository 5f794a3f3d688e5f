"""The math of online RL on token rewards: advantages (GAE, RLOO, GRPO with dense token credit), the clipped
policy loss and its aggregations, the k3 KL estimator. Pure tensor functions over right-padded [B, T] batches whose
``mask`` is 1 on response tokens (a response is a prefix of its row); a prompt's k samples are consecutive rows.

- GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"):
      delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = sum_l (gamma * lam)^l delta_{t+l},    R_t = A_t + V_t
  with V = 0 after the last response token (the episode ends there).
- PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"), per token, with DAPO's asymmetric clip
  (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", "clip-higher"):
      l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high)),    rho_t = exp(logp_t - logp_old_t)
  aggregated as TRL's GRPOTrainer ``loss_type`` names them (L = max completion length, B rows):
      dapo     sum_{i,t} l_{i,t} / sum_{i,t} mask          (a token mean over the optimizer step's rows)
      grpo     1/B sum_i (sum_t l_{i,t} / |y_i|)           (a mean over sequences of their token means)
      dr_grpo  sum_{i,t} l_{i,t} / (B * L)                 (Liu et al. 2025, "Understanding R1-Zero-Like Training")
      L_V  = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2)
- RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
  Feedback in LLMs"; Kool et al. 2019) with per-token returns: for sample i of k for one prompt,
      G^i_t = sum_{s >= t} r^i_s,    A^i_t = G^i_t - 1/(k-1) sum_{j != i} G^j_t     (G^j_t = 0 past j's end)
  The baseline is the other samples' return from the same position: it never depends on sample i, so the
  gradient stays unbiased, and with dense rewards (ABC) it tracks how much reward is left at step t. With a
  sparse reward every G_t is the sequence reward and this is the usual sequence-level RLOO.
- GRPO (Shao et al. 2024, "DeepSeekMath", section 4.1), outcome supervision: sample i of group g with reward R_i,
      A_i = (R_i - mean_g R) / (std_g R + 1e-4)         (std unbiased, as TRL; ``scale=False`` drops it: Dr. GRPO)
  put on every token of sample i. Dense credit c_{i,t} (ABC, contrastive r_hat, DPO-implicit) joins it centred and
  scaled over the tokens of the group, as DeepSeekMath's process supervision normalizes its step rewards with the
  group's mean and std (section 4.1.3), and weighted by w (``rl.credit_weight``):
      A_{i,t} = A_i + w * (c_{i,t} - mu_g) / (sigma_g + 1e-4),    mu_g, sigma_g over {c_{j,s}: j in g, s in y_j}
  The token term is the token's own credit, not DeepSeekMath's sum over later steps: a T-REG or ABC token reward
  judges the token itself, and a sum over hundreds of later tokens would bury it under the response's length. The
  term sums to 0 over a group's tokens, so the sequence advantages carry the outcome and the token term only moves
  credit between tokens (docs/algorithms.md has a test vector).
- KL to pi_ref as a loss term (``kl_penalty: loss``), Schulman's k3 estimator as TRL's GRPO uses it, per token,
  importance-weighted because the tokens were sampled from pi_old:
      kl_t = rho_t * (exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1)   (>= 0)
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


def _check_groups(rewards: torch.Tensor, k: int, method: str = "RLOO") -> None:
    if k < 2:
        raise ValueError(f"{method} needs at least 2 samples per prompt (rl.samples_per_prompt >= 2)")
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


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (clipped surrogate loss l_t, whether clipping was active), both [B, T]; aggregate with
    :func:`aggregate_loss`."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, max_length: int) -> torch.Tensor:
    """One loss from per-token losses: ``dapo`` token mean, ``grpo`` mean of per-sequence means, ``dr_grpo`` sum
    over B * ``max_length`` (the module docstring has the formulas)."""
    if loss_type == "dapo":
        return masked_mean(per_token, mask)
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.shape[0] * max_length)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = logp_ref - logp. The samples come from
    pi_old, so with ``old_logp`` it is weighted by rho_t = pi / pi_old, which keeps it unbiased on later minibatches
    (TRL's ``use_bias_correction_kl``, its default)."""
    delta = ref_logp - logp
    kl = torch.exp(delta) - delta - 1.0
    return kl if old_logp is None else kl * torch.exp(logp - old_logp)


def group_advantages(scores: torch.Tensor, k: int, scale: bool = True) -> torch.Tensor:
    """GRPO's sequence advantages [N] from rewards [N] in groups of ``k`` consecutive samples: the group mean
    subtracted, divided by the group's (unbiased) std + 1e-4 when ``scale``."""
    _check_groups(scores, k, "GRPO")
    grouped = scores.view(-1, k)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(1, keepdim=True) + 1e-4)
    return advantages.view(-1)


def group_token_credit(credit: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Dense credit [B, T] centred and scaled over each group's response tokens: (c - mu_g) / (sigma_g + 1e-4),
    sigma_g the unbiased std; 0 off the mask, and 0 for a group whose credit is constant."""
    _check_groups(credit, k, "GRPO")
    c, m = (credit * mask).view(-1, k * credit.shape[1]), mask.view(-1, k * mask.shape[1])
    n = m.sum(1, keepdim=True)
    mean = c.sum(1, keepdim=True) / n.clamp(min=1)
    variance = (((c - mean) ** 2) * m).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    return (((c - mean) / (variance.sqrt() + 1e-4)) * m).view_as(credit)


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
