"""The online-RL stage: advantage and loss math against hand-computed values, ABC's official form on policy tokens,
and the trainer on tiny models (every parameter moves, a learnable reward rises, resume is exact)."""

import logging
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import Interrupt, stop_at, train_reward_model
from transformers import AutoModelForCausalLM

from creditflow.tasks.configs import LoraConfig, RewardModelConfig, RLConfig
from creditflow.tasks.credit.attention_credit import abc_token_rewards, official_policy_rewards
from creditflow.tasks.credit.rl_rewards import Rollout, TokenRewards, token_spans
from creditflow.tasks.data import schema as S
from creditflow.tasks.losses.rl import (
    AdaptiveKL,
    gae,
    ppo_policy_loss,
    returns_to_go,
    rloo_advantages,
    rloo_token_advantages,
    value_loss,
    whiten,
)
from creditflow.tasks.models.loading import load_tokenizer
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.recipes.reward_model import PairData
from creditflow.tasks.recipes.rl import RLTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = ["great", "wonderful", "lovely", "happy"]
BAD = ["awful", "terrible", "sad", "grim"]


def _prompt(i: int) -> S.Messages:
    return [{"role": "user", "content": f"How was day {i}?"}]


# ---------------------------------------------------------------------------------------------------------
# The math


def test_gae_matches_hand_computed_values_and_stops_at_each_rows_end():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 ends after 2 tokens: its padding is ignored
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_t = r_t + 0.9 V_{t+1} - V_t;  A_t = delta_t + 0.72 A_{t+1}
    torch.testing.assert_close(advantages, torch.tensor([[1.58576, 1.258, 1.9], [1.31, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.08576, 1.458, 2.0], [1.81, 1.0, 0.0]]))


def test_ppo_policy_loss_clips_both_ways_and_passes_no_gradient_through_clipped_tokens():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    old, advantages, mask = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    loss, clipped = ppo_policy_loss(logp, old, advantages, mask, clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped); token 3: -2.2
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8 - 2.2) / 3) and float(clipped) == pytest.approx(2 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.2 / 3]]))


def test_value_loss_takes_the_larger_of_the_clipped_and_unclipped_errors():
    values, old = torch.tensor([[1.5, 0.0]]), torch.tensor([[1.0, 0.0]])
    loss, clipped = value_loss(values, old, torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), clip_range=0.2)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.0) / 2) and float(clipped) == pytest.approx(0.5)


def test_rloo_token_uses_the_other_samples_returns_from_the_same_position():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # G^A = [1, 1, 1], G^B = [1, 0.5, 0] (0 past its end)
    expected = torch.tensor([[0.0, 0.5, 1.0], [0.0, -0.5, 0.0]])
    torch.testing.assert_close(rloo_token_advantages(rewards, mask, k=2), expected)
    three = torch.tensor([[1.0], [2.0], [6.0]])
    expected = torch.tensor([[-3.0], [-1.5], [4.5]])
    torch.testing.assert_close(rloo_token_advantages(three, torch.ones(3, 1), k=3), expected)
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_token_advantages(rewards, mask, k=1)


def test_rloo_is_sequence_level_as_trl_and_differs_from_the_per_token_form():
    """docs/algorithms.md's vector: k = 2, reward 1 on the last token of both, lengths 10 and 5."""
    mask = torch.zeros(2, 10)
    mask[0, :10], mask[1, :5] = 1.0, 1.0
    rewards = torch.zeros(2, 10)
    rewards[0, 9], rewards[1, 4] = 1.0, 1.0
    assert torch.equal(rloo_advantages(rewards, mask, k=2), torch.zeros(2, 10))
    per_token = torch.zeros(2, 10)
    per_token[0, 5:] = 1.0
    torch.testing.assert_close(rloo_token_advantages(rewards, mask, k=2), per_token)
    # R = [1, 2, 6] for one prompt: each minus the mean of the other two, on every token of its row (TRL's RLOO)
    three = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 4.0]])
    expected = torch.tensor([[-3.0, -3.0], [-1.5, -1.5], [4.5, 4.5]])
    torch.testing.assert_close(rloo_advantages(three, torch.ones(3, 2), k=3), expected)
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_advantages(rewards, mask, k=1)


def test_whitening_and_the_adaptive_kl_controller():
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    controller = AdaptiveKL(0.1, target=1.0, horizon=100)
    controller.update(kl=2.0, n_samples=10)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    fixed = AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(kl=50.0, n_samples=10)
    assert fixed.value == 0.1


def test_abc_official_rewards_on_policy_tokens_sum_to_r_with_the_remainder_on_the_last_policy_token():
    rm_rewards = abc_token_rewards(torch.tensor([1.0, 3.0]), reward=2.0, beta=0.8).numpy()  # RM tokens [0,3) [3,6)
    # Policy tokens [0,2) [2,6) and an EOS with an empty span: the remainder goes to the EOS, not to [2,6).
    rewards = official_policy_rewards(rm_rewards, [0, 3], [3, 6], [0, 2, 6], [2, 6, 6], beta=0.8)
    np.testing.assert_allclose(rewards, [0.8 * 2 * 0.25 * 2 / 3, 0.8 * 2 * (0.25 / 3 + 0.75), 0.2 * 2], rtol=1e-6)
    assert rewards.sum() == pytest.approx(2.0)
    returns = returns_to_go(torch.from_numpy(rewards)[None], torch.ones(1, 3))
    assert float(returns[0, 0]) == pytest.approx(2.0)  # the return of the whole response is r, as with sparse
    sparse = official_policy_rewards(rm_rewards, [0, 3], [3, 6], [0, 2, 6], [2, 6, 6], beta=0.0)
    np.testing.assert_allclose(sparse, [0.0, 0.0, 2.0], atol=1e-7)  # beta = 0 is the sparse reward


def test_token_spans_tile_the_decoded_text(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    ids = tokenizer("It was great and lovely", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text, starts, ends = token_spans(tokenizer, ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert starts[0] == 0 and ends[-1] == len(text) and starts[1:] == ends[:-1] and starts[-1] == ends[-1]


def test_bad_configs_are_clear():
    for algorithm in ("rloo", "rloo_token"):
        with pytest.raises(ValueError, match=f"'{algorithm}' needs samples_per_prompt >= 2"):
            RLConfig(algorithm=algorithm, samples_per_prompt=1)
    with pytest.raises(ValueError, match="cannot fill 4 minibatches"):
        RLConfig(batch_size=1, samples_per_prompt=2, minibatches=4)


# ---------------------------------------------------------------------------------------------------------
# The trainer on tiny models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    corpus = [f"It was {w} and {v}." for w in GOOD + BAD for v in GOOD + BAD] + [f"How was day {i}?" for i in range(9)]
    return build_tiny_causal_lm(tmp_path_factory.mktemp("rl_lm"), corpus * 2, seed=0)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, model_dir):
    """A tiny reward model trained to prefer answers with a GOOD word: a reward the policy can learn to get."""
    n = 48
    prompts = [_prompt(i) for i in range(n)]
    chosen = [[{"role": "assistant", "content": f"It was {GOOD[i % 4]} and {GOOD[(i + 1) % 4]}."}] for i in range(n)]
    rejected = [[{"role": "assistant", "content": f"It was {BAD[i % 4]} and {BAD[(i + 1) % 4]}."}] for i in range(n)]
    data = PairData(prompts, chosen, rejected, [0.0] * n)
    texts = [m["content"] for rows in (prompts, chosen, rejected) for conv in rows for m in conv]
    base = build_tiny_reward_backbone(tmp_path_factory.mktemp("rl_rm_base"), texts, seed=0)
    config = RewardModelConfig(base_model=str(base), max_steps=60, learning_rate=3e-3, batch_size=8)
    tokenizer, model, _ = train_reward_model(base, data, data, config, progress=False)
    folder = tmp_path_factory.mktemp("rl_rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PROMPTS = [_prompt(i) for i in range(8)]


def _config(**overrides) -> RLConfig:
    settings = dict(
        batch_size=4,
        samples_per_prompt=2,
        max_steps=2,
        learning_rate=1e-3,
        minibatches=2,
        ppo_epochs=1,
        gold_scorer=None,
        sampling={"max_new_tokens": 6, "batch_size": 4},
    )
    return RLConfig.model_validate({**settings, **overrides})


def _train(model_dir, reward_dir, config, **kwargs):
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False, **kwargs)
    return trainer, trainer.train()


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "rloo_token"])
def test_every_trainable_parameter_changes_and_the_first_rollouts_have_zero_kl(model_dir, reward_dir, algorithm):
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, _config(algorithm=algorithm), progress=False)
    before = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    history = trainer.train()
    unchanged = [n for n, p in trainer.trainable.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, unchanged
    assert any(n.startswith("value_head.") for n in trainer.trainable) == (algorithm == "ppo")
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # sampled before any update: pi == pi_ref
    assert all(math.isfinite(h["policy_loss"]) for h in history)
    assert len(trainer.samples) == 2 * 4 * 2


def test_lora_reads_the_reference_through_disabled_adapters(model_dir, reward_dir):
    config = _config(lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), max_steps=3)
    trainer, history = _train(model_dir, reward_dir, config)
    assert trainer.frozen_reference is None
    assert all("lora_" in n or n.startswith("value_head.") for n in trainer.trainable)
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[-1]["kl"] != 0.0


@pytest.mark.parametrize("source", ["sparse", "abc", "contrastive", "abc+contrastive"])
def test_each_reward_source_gives_per_token_rewards(model_dir, reward_dir, source):
    trainer, history = _train(model_dir, reward_dir, _config(reward_source=source, max_steps=1))
    first = history[0]
    if source in ("sparse", "abc"):  # both spread exactly r over the tokens
        assert first["token_reward_sum"] == pytest.approx(first["reward"], abs=1e-4)
    else:  # r_hat adds its own per-token signal on top
        assert first["token_reward_sum"] != pytest.approx(first["reward"], abs=1e-6)


def _scored(trainer, rewards: TokenRewards, rollouts):
    with torch.no_grad(), trainer.reference() as reference:
        return rewards(rollouts, reference, trainer.tokenizer)


def test_abc_rewards_reach_tokens_before_the_last_and_nothing_falls_back(model_dir, reward_dir):
    trainer, history = _train(model_dir, reward_dir, _config(reward_source="abc", max_steps=1))
    assert history[0]["abc_fallback_fraction"] == 0.0
    rollouts = trainer._rollouts(1)
    rewards, scores, fallbacks = _scored(trainer, trainer.rewards, rollouts)
    assert fallbacks == 0
    long = [(x, s) for x, s in zip(rewards, scores) if len(x) > 1]
    assert long and all(np.any(x[:-1] != 0.0) for x, _ in long)  # the sparse reward would leave them all 0
    assert [float(x.sum()) for x, _ in long] == pytest.approx([s for _, s in long], abs=1e-5)


def test_abc_rollouts_the_reward_model_cannot_see_get_the_sparse_reward_counted_and_warned(
    model_dir, reward_dir, caplog
):
    # max_length 2 holds only the chat template's closing "<|im_end|>\n": no response token survives
    with caplog.at_level(logging.WARNING, logger="creditflow.tasks.recipes.rl"):
        trainer, history = _train(model_dir, reward_dir, _config(reward_source="abc", max_steps=1), rm_max_length=2)
    assert history[0]["abc_fallback_fraction"] == 1.0
    assert "8 of 8 rollouts got the sparse reward" in caplog.text
    rewards, scores, fallbacks = _scored(trainer, trainer.rewards, trainer._rollouts(1))
    assert fallbacks == len(rewards) and all(np.all(x[:-1] == 0.0) and x[-1] == s for x, s in zip(rewards, scores))


def test_abc_refuses_a_reward_model_whose_template_rewrites_the_response(model_dir, reward_dir, tmp_path):
    # Not a response ABC cannot see but a reward model it cannot read: an error, not a silent sparse reward.
    folder = shutil.copytree(reward_dir, tmp_path / "rm")
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | upper")
    tokenizer.save_pretrained(folder)
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, _config(reward_source="abc"), progress=False)
    ids = trainer.tokenizer("It was great", add_special_tokens=False)["input_ids"]
    rollout = Rollout(PROMPTS[0], [], ids, *token_spans(trainer.tokenizer, ids))
    rewards = TokenRewards(folder, trainer.config, trainer.device, 512)
    with pytest.raises(ValueError, match="does not render the response text verbatim"):
        _scored(trainer, rewards, [rollout])


def test_a_learnable_reward_rises(model_dir, reward_dir):
    config = _config(
        algorithm="rloo", samples_per_prompt=4, epochs=8, max_steps=16, learning_rate=1e-2, reward_source="sparse"
    )
    _, history = _train(model_dir, reward_dir, config)
    early = np.mean([h["reward"] for h in history[:3]])
    late = np.mean([h["reward"] for h in history[-3:]])
    assert late > early + 0.5, [round(h["reward"], 3) for h in history]


@pytest.mark.parametrize("kl_target", [None, 0.5], ids=["fixed-kl", "adaptive-kl"])
def test_an_interrupted_run_resumes_exactly(model_dir, reward_dir, tmp_path, kl_target):
    # horizon 100: the adaptive coefficient moves ~3% per iteration, so a coefficient not restored shows
    config = _config(epochs=3, max_steps=5, save_every=2, warmup_ratio=0.2, kl_target=kl_target, kl_horizon=100)
    straight, straight_history = _train(model_dir, reward_dir, config)

    with pytest.raises(Interrupt):
        _train(model_dir, reward_dir, config, checkpoint_dir=tmp_path / "ckpt", on_step=stop_at(3))
    steps = []
    resumed, history = _train(
        model_dir, reward_dir, config, checkpoint_dir=tmp_path / "ckpt", on_step=lambda s, m: steps.append(s)
    )
    assert steps == [3, 4, 5] and [h["step"] for h in history] == [1, 2, 3, 4, 5]
    for name, param in straight.trainable.items():
        torch.testing.assert_close(param, resumed.trainable[name], atol=1e-6, rtol=0)
    keys = ("reward", "kl", "policy_loss", "value_loss")
    assert [h[k] for h in history for k in keys] == pytest.approx([h[k] for h in straight_history for k in keys])
    assert resumed.samples == straight.samples
    assert [h["kl_coef"] for h in history] == [h["kl_coef"] for h in straight_history]
    assert resumed.kl.value == straight.kl.value and (kl_target is None) == (resumed.kl.value == config.kl_coef)


def test_the_saved_policy_loads(model_dir, reward_dir, tmp_path):
    from creditflow.tasks.models.causal_lm import save_trained_lm

    trainer, _ = _train(model_dir, reward_dir, _config(max_steps=1))
    save_trained_lm(trainer.model, False, model_dir, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trainer.model.state_dict()[name])
