"""Preference losses on per-token log-probs, each with the optional T-REG token-level regularizer.

All inputs are ``[B, T]`` tensors over completion tokens, zero where the mask is zero:
``logp_*`` policy log-probs (with grad), ``ref_*`` reference log-probs, ``mask_*`` completion masks,
``rewards_*`` token rewards r̂ in (-0.5, 0.5). Suffix ``w`` is the chosen response, ``l`` the rejected one.

Sequence losses
    DPO (Rafailov et al. 2023, "Direct Preference Optimization"), sigmoid form with optional label smoothing ε:
        Δ(y) = Σ_t m_t (ℓ_t − ℓ^ref_t),  z = β (Δ(y_w) − Δ(y_l)),  L = −(1−ε) log σ(z) − ε log σ(−z)
    IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"),
    on length-averaged log-ratios as in TRL:  h = Δ̄(y_w) − Δ̄(y_l),  L = (h − 1/(2β))²
    SimPO (Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"):
        r_S(y) = (β/|y|) Σ_t m_t ℓ_t,  z = r_S(y_w) − r_S(y_l) − γ,  L = −log σ(z)

T-REG regularizer (Zhou, Zhang, Zhao, Meng 2024, "T-REG: Preference Optimization with Token-Level Reward
Regularization", arXiv 2412.02685), added with weight α and a detached sequence weight w:
        L_total = L + α · w · (L_REG(y_w) + L_REG(y_l))
    DPO:   L_REG(y) = −β Σ_t m_t r̂_t ℓ_t,          w = sg(max(σ(−z) − ε, 0))   (the coefficient of the DPO gradient)
    SimPO: L_REG(y) = −(β/|y|) Σ_t m_t r̂_t ℓ_t,    w = sg(σ(−z))   (z includes the margin γ)
    IPO:   L_REG(y) = −(β/|y|) Σ_t m_t r̂_t ℓ_t,    w = sg(clamp(1 − 2βh, 0, 1))
The IPO pairing is our choice (the paper covers DPO and SimPO): IPO's implicit token reward is length-normalized,
and its gradient magnitude |h − 1/(2β)|, scaled to 1 at h = 0, vanishes once the pair reaches its target margin.
Token rewards r̂ come from contrastive prompting (in (−0.5, 0.5) by construction) or from ABC, made comparable:
centered by the reward model's mean over the trained pairs, standardized, spread by the attention shares and
squashed into (−0.5, 0.5) (``abc.regularizer_rewards``). The raw official ABC form (Σ_t r_t = r, the remainder on
the last token) stays what the token-reward stage stores, for online RL.

NLL term (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's ``rpo_alpha``), added to
any of them with weight λ = ``rpo_alpha``: the mean negative log-likelihood of the chosen responses' tokens,
        L_total += λ · (−Σ_{b,t} m_w ℓ_w / Σ_{b,t} m_w)
It pushes up every chosen token without token labels: the credit gym's no-label control for T-REG.

With label smoothing ε (DPO only; the config refuses it for IPO and SimPO) the DPO gradient's coefficient is
−∂L/∂z = σ(−z) − ε, which turns negative once σ(−z) < ε (a pair learned past the smoothing target). w clamps it at
0: the regularizer then stops rather than pushing the token rewards the other way. With α = 0 every loss is exactly
its plain form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from creditflow.tasks.configs import PreferenceLossConfig


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, with grad
    sequence_loss: torch.Tensor  # [B], the plain DPO/IPO/SimPO term
    regularizer: torch.Tensor  # [B], L_REG(y_w) + L_REG(y_l), before α·w
    weight: torch.Tensor  # [B], the detached w
    rewards_chosen: torch.Tensor  # [B], implicit sequence rewards (detached)
    rewards_rejected: torch.Tensor

    def metrics(self) -> dict[str, float]:
        margin = self.rewards_chosen - self.rewards_rejected
        return {
            "loss": self.loss.item(),
            "sequence_loss": self.sequence_loss.mean().item(),
            "regularizer": self.regularizer.mean().item(),
            "weight": self.weight.mean().item(),
            "rewards/chosen": self.rewards_chosen.mean().item(),
            "rewards/rejected": self.rewards_rejected.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
        }


def preference_loss(
    config: PreferenceLossConfig,
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    mask_w: torch.Tensor,
    mask_l: torch.Tensor,
    ref_w: torch.Tensor | None = None,
    ref_l: torch.Tensor | None = None,
    rewards_w: torch.Tensor | None = None,
    rewards_l: torch.Tensor | None = None,
) -> LossOutput:
    """The configured loss, averaged over the batch. DPO and IPO need ``ref_*``; α > 0 needs ``rewards_*``."""
    beta = config.beta
    length_w, length_l = mask_w.sum(-1).clamp(min=1), mask_l.sum(-1).clamp(min=1)
    if config.loss_type == "simpo":
        reward_w = beta * (mask_w * logp_w).sum(-1) / length_w
        reward_l = beta * (mask_l * logp_l).sum(-1) / length_l
        z = reward_w - reward_l - config.gamma
        sequence = -F.logsigmoid(z)
        weight = torch.sigmoid(-z).detach()
    else:
        if ref_w is None or ref_l is None:
            raise ValueError(f"{config.loss_type} needs reference log-probs")
        ratio_w = (mask_w * (logp_w - ref_w)).sum(-1)
        ratio_l = (mask_l * (logp_l - ref_l)).sum(-1)
        if config.loss_type == "dpo":
            reward_w, reward_l = beta * ratio_w, beta * ratio_l
            z = reward_w - reward_l
            eps = config.label_smoothing
            sequence = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            weight = (torch.sigmoid(-z) - eps).clamp(min=0).detach()
        else:  # ipo
            h = ratio_w / length_w - ratio_l / length_l
            reward_w, reward_l = beta * ratio_w / length_w, beta * ratio_l / length_l
            sequence = (h - 1 / (2 * beta)) ** 2
            weight = (1 - 2 * beta * h).clamp(0, 1).detach()

    if config.alpha == 0:
        regularizer = torch.zeros_like(sequence)
        loss = sequence.mean()
    else:
        if rewards_w is None or rewards_l is None:
            raise ValueError("alpha > 0 needs token rewards (the T-REG regularizer)")
        reg_w = -beta * (mask_w * rewards_w * logp_w).sum(-1)
        reg_l = -beta * (mask_l * rewards_l * logp_l).sum(-1)
        if config.loss_type in ("simpo", "ipo"):
            reg_w, reg_l = reg_w / length_w, reg_l / length_l
        regularizer = reg_w + reg_l
        loss = (sequence + config.alpha * weight * regularizer).mean()
    if config.rpo_alpha:
        loss = loss + config.rpo_alpha * -(mask_w * logp_w).sum() / mask_w.sum().clamp(min=1)
    return LossOutput(loss, sequence.detach(), regularizer.detach(), weight, reward_w.detach(), reward_l.detach())


def token_reward_correlation(
    logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, token_rewards: torch.Tensor, beta: float
) -> float:
    """Pearson correlation over real tokens between the implicit token reward β(ℓ − ℓ^ref) and r̂."""
    keep = mask.bool()
    implicit = (beta * (logp - ref))[keep].detach().float()
    target = token_rewards[keep].float()
    if implicit.numel() < 2 or implicit.std() == 0 or target.std() == 0:
        return float("nan")
    return torch.corrcoef(torch.stack([implicit, target]))[0, 1].item()
