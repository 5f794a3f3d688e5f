"""DPO / IPO / SimPO with the T-REG regularizer: values against plain-Python references, analytic gradients."""

import math

import pytest
import torch

from creditflow.tasks.losses.preference import PreferenceLossConfig, preference_loss, token_reward_correlation

# Two pairs, three completion positions; the zeros under a zero mask are padding.
LOGP_W = [[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]]
REF_W = [[-1.2, -1.5, -0.7], [-0.5, -1.0, 0.0]]
MASK_W = [[1, 1, 1], [1, 1, 0]]
LOGP_L = [[-2.0, -1.0, 0.0], [-0.8, -0.4, -1.5]]
REF_L = [[-1.5, -1.5, 0.0], [-0.6, -0.6, -1.0]]
MASK_L = [[1, 1, 0], [1, 1, 1]]
RH_W = [[0.2, -0.1, 0.3], [0.1, 0.4, 0.0]]
RH_L = [[-0.3, 0.1, 0.0], [0.05, -0.2, -0.4]]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def masked_sum(values, mask, weights=None):
    weights = weights or [1.0] * len(values)
    return sum(v * m * w for v, m, w in zip(values, mask, weights))


def reference_loss(kind: str, beta: float, alpha: float, gamma: float = 0.5) -> float:
    """The module docstring's formulas, evaluated one pair at a time in plain Python."""
    total = 0.0
    for b in range(2):
        n_w, n_l = sum(MASK_W[b]), sum(MASK_L[b])
        reg_w = -beta * masked_sum(LOGP_W[b], MASK_W[b], RH_W[b])
        reg_l = -beta * masked_sum(LOGP_L[b], MASK_L[b], RH_L[b])
        if kind == "dpo":
            z = beta * (
                masked_sum([p - r for p, r in zip(LOGP_W[b], REF_W[b])], MASK_W[b])
                - masked_sum([p - r for p, r in zip(LOGP_L[b], REF_L[b])], MASK_L[b])
            )
            seq, w = -math.log(sigmoid(z)), sigmoid(-z)
        elif kind == "simpo":
            z = beta * masked_sum(LOGP_W[b], MASK_W[b]) / n_w - beta * masked_sum(LOGP_L[b], MASK_L[b]) / n_l - gamma
            seq, w = -math.log(sigmoid(z)), sigmoid(-z)
            reg_w, reg_l = reg_w / n_w, reg_l / n_l
        else:
            h = (
                masked_sum([p - r for p, r in zip(LOGP_W[b], REF_W[b])], MASK_W[b]) / n_w
                - masked_sum([p - r for p, r in zip(LOGP_L[b], REF_L[b])], MASK_L[b]) / n_l
            )
            seq, w = (h - 1 / (2 * beta)) ** 2, min(1.0, max(0.0, 1 - 2 * beta * h))
            reg_w, reg_l = reg_w / n_w, reg_l / n_l
        total += seq + alpha * w * (reg_w + reg_l)
    return total / 2


def tensors(requires_grad=False):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    logp_w, logp_l = t(LOGP_W).requires_grad_(requires_grad), t(LOGP_L).requires_grad_(requires_grad)
    return dict(
        logp_w=logp_w,
        logp_l=logp_l,
        mask_w=t(MASK_W),
        mask_l=t(MASK_L),
        ref_w=t(REF_W),
        ref_l=t(REF_L),
        rewards_w=t(RH_W),
        rewards_l=t(RH_L),
    )


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_loss_values_match_the_formulas(kind, alpha):
    out = preference_loss(PreferenceLossConfig(loss_type=kind, beta=0.5, alpha=alpha, gamma=0.5), **tensors())
    assert out.loss.item() == pytest.approx(reference_loss(kind, 0.5, alpha), abs=1e-12)


def test_dpo_hand_value():
    # Pair 1: Δw = 0.2 - 0.5 + 0.2 = -0.1, Δl = -0.5 + 0.5 = 0 -> z = 0.5 * -0.1 = -0.05
    # Pair 2: Δw = 0.2 - 0.2 = 0, Δl = -0.2 + 0.2 - 0.5 = -0.5 -> z = 0.25
    expected = (-math.log(sigmoid(-0.05)) - math.log(sigmoid(0.25))) / 2
    out = preference_loss(PreferenceLossConfig(beta=0.5), **tensors())
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.rewards_chosen.tolist() == pytest.approx([-0.05, 0.0])
    assert out.rewards_rejected.tolist() == pytest.approx([0.0, -0.25])
    assert out.metrics()["rewards/accuracy"] == 0.5


@pytest.mark.parametrize("kind", ["dpo", "ipo", "simpo"])
def test_alpha_zero_is_exactly_the_plain_loss(kind):
    plain_inputs, reg_inputs = tensors(True), tensors(True)
    del plain_inputs["rewards_w"], plain_inputs["rewards_l"]
    plain = preference_loss(PreferenceLossConfig(loss_type=kind, beta=0.5), **plain_inputs)
    with_rewards = preference_loss(PreferenceLossConfig(loss_type=kind, beta=0.5, alpha=0.0), **reg_inputs)
    assert torch.equal(plain.loss, with_rewards.loss)
    plain.loss.backward()
    with_rewards.loss.backward()
    assert torch.equal(plain_inputs["logp_w"].grad, reg_inputs["logp_w"].grad)
    assert torch.equal(plain_inputs["logp_l"].grad, reg_inputs["logp_l"].grad)


def test_dpo_treg_gradient_matches_the_analytic_form():
    """∂L/∂ℓ_w,t = (−β σ(−z) m_t − α w β r̂_w,t m_t)/B, ∂L/∂ℓ_l,t = (+β σ(−z) m_t − α w β r̂_l,t m_t)/B."""
    beta, alpha = 0.5, 0.25
    inputs = tensors(True)
    out = preference_loss(PreferenceLossConfig(beta=beta, alpha=alpha), **inputs)
    out.loss.backward()
    z = out.rewards_chosen - out.rewards_rejected
    w = torch.sigmoid(-z)[:, None]
    m_w, m_l = inputs["mask_w"], inputs["mask_l"]
    expected_w = (-beta * w * m_w - alpha * w * beta * inputs["rewards_w"] * m_w) / 2
    expected_l = (beta * w * m_l - alpha * w * beta * inputs["rewards_l"] * m_l) / 2
    assert torch.allclose(inputs["logp_w"].grad, expected_w, atol=1e-12)
    assert torch.allclose(inputs["logp_l"].grad, expected_l, atol=1e-12)


def test_simpo_treg_gradient_is_length_normalized():
    beta, alpha, gamma = 2.0, 0.5, 0.3
    inputs = tensors(True)
    out = preference_loss(PreferenceLossConfig(loss_type="simpo", beta=beta, alpha=alpha, gamma=gamma), **inputs)
    out.loss.backward()
    w = torch.sigmoid(-(out.rewards_chosen - out.rewards_rejected - gamma))[:, None]
    n_w, n_l = inputs["mask_w"].sum(-1, keepdim=True), inputs["mask_l"].sum(-1, keepdim=True)
    expected_w = (-(beta / n_w) * w - alpha * w * (beta / n_w) * inputs["rewards_w"]) * inputs["mask_w"] / 2
    expected_l = ((beta / n_l) * w - alpha * w * (beta / n_l) * inputs["rewards_l"]) * inputs["mask_l"] / 2
    assert torch.allclose(inputs["logp_w"].grad, expected_w, atol=1e-12)
    assert torch.allclose(inputs["logp_l"].grad, expected_l, atol=1e-12)


def test_weight_is_detached_and_regularizer_sign_follows_token_rewards():
    inputs = tensors(True)
    out = preference_loss(PreferenceLossConfig(beta=0.5, alpha=1.0), **inputs)
    assert not out.weight.requires_grad
    # Raising ℓ on a token with r̂ > 0 lowers the regularizer; with r̂ < 0 it raises it.
    inputs = tensors(True)
    reg = -0.5 * (inputs["mask_w"] * inputs["rewards_w"] * inputs["logp_w"]).sum()
    reg.backward()
    assert inputs["logp_w"].grad[0, 0] < 0 < inputs["logp_w"].grad[0, 1]


def test_missing_inputs_are_refused():
    inputs = tensors()
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(PreferenceLossConfig(), inputs["logp_w"], inputs["logp_l"], inputs["mask_w"], inputs["mask_l"])
    with pytest.raises(ValueError, match="needs token rewards"):
        preference_loss(
            PreferenceLossConfig(alpha=0.1), **{k: v for k, v in inputs.items() if not k.startswith("rewards")}
        )
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceLossConfig(loss_type="kto")


def test_token_reward_correlation():
    logp = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    ref = torch.zeros_like(logp)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert token_reward_correlation(logp, ref, mask, torch.tensor([[1.0, 2.0, 3.0, -5.0]]), beta=0.1) == pytest.approx(
        1.0
    )
    assert token_reward_correlation(logp, ref, mask, torch.tensor([[3.0, 2.0, 1.0, 0.0]]), beta=0.1) == pytest.approx(
        -1.0
    )
    assert math.isnan(token_reward_correlation(logp, ref, mask, torch.ones(1, 4), beta=0.1))


def test_label_smoothing_weight_is_the_real_gradient_coefficient_clamped_at_zero():
    """With ε, −∂L_DPO/∂z = σ(−z) − ε: the T-REG weight follows it, and stops (0) once it would turn negative."""
    inputs = tensors(requires_grad=True)
    eps = 0.2
    out = preference_loss(PreferenceLossConfig(beta=0.5, alpha=1.0, label_smoothing=eps), **inputs)
    z = (out.rewards_chosen - out.rewards_rejected).detach()
    expected = (torch.sigmoid(-z) - eps).clamp(min=0)
    assert torch.allclose(out.weight, expected)
    # The same coefficient, from autograd: d sequence_loss / dz.
    z_leaf = z.clone().requires_grad_(True)
    seq = -(1 - eps) * torch.nn.functional.logsigmoid(z_leaf) - eps * torch.nn.functional.logsigmoid(-z_leaf)
    (grad,) = torch.autograd.grad(seq.sum(), z_leaf)
    assert torch.allclose(out.weight, (-grad).clamp(min=0))
    far = preference_loss(PreferenceLossConfig(beta=50.0, alpha=1.0, label_smoothing=eps), **tensors())
    assert (far.weight >= 0).all() and (far.weight == 0).any()  # learned past the smoothing target: no push back


@pytest.mark.parametrize("kind", ["ipo", "simpo"])
def test_label_smoothing_outside_dpo_is_refused(kind):
    with pytest.raises(ValueError, match=f"label_smoothing applies to dpo only, not {kind}"):
        PreferenceLossConfig(loss_type=kind, label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_rpo_alpha_adds_the_chosen_tokens_mean_nll(kind):
    # chosen tokens: -1.0, -2.0, -0.5 and -0.3, -1.2 (the third of pair 2 is padding): mean NLL 5.0 / 5 = 1.0
    plain = preference_loss(PreferenceLossConfig(loss_type=kind, beta=0.5), **tensors())
    inputs = tensors(True)
    rpo = preference_loss(PreferenceLossConfig(loss_type=kind, beta=0.5, rpo_alpha=0.5), **inputs)
    assert rpo.loss.item() == pytest.approx(plain.loss.item() + 0.5 * 1.0, abs=1e-12)
    rpo.loss.backward()
    plain_inputs = tensors(True)
    preference_loss(PreferenceLossConfig(loss_type=kind, beta=0.5), **plain_inputs).loss.backward()
    # the NLL's gradient on each chosen token is -0.5 / 5, on padding 0; the rejected side is untouched
    extra = inputs["logp_w"].grad - plain_inputs["logp_w"].grad
    torch.testing.assert_close(extra, -0.1 * torch.tensor(MASK_W, dtype=torch.float64))
    torch.testing.assert_close(inputs["logp_l"].grad, plain_inputs["logp_l"].grad)
