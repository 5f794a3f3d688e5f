"""The online-RL stage: advantage and loss math against hand-computed values and TRL's GRPO loss, ABC's official form
on policy tokens, and the trainer on tiny models (every parameter moves, a learnable reward rises, resume is exact)
for every algorithm and reward source."""

import logging
import math
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import Interrupt, stop_at, train_reward_model
from transformers import AutoModelForCausalLM

from creditflow.tasks.configs import TEMPLATE_PRESETS, LoraConfig, RewardModelConfig, RLConfig
from creditflow.tasks.credit.attention_credit import abc_token_rewards, official_policy_rewards
from creditflow.tasks.credit.rl_rewards import Rollout, TokenRewards, token_spans
from creditflow.tasks.data import schema as S
from creditflow.tasks.losses.rl import (
    AdaptiveKL,
    aggregate_loss,
    clipped_policy_loss,
    gae,
    group_advantages,
    group_token_credit,
    k3_kl,
    returns_to_go,
    rloo_advantages,
    rloo_token_advantages,
    value_loss,
    whiten,
)
from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
from creditflow.tasks.models.logprobs import completion_logprobs
from creditflow.tasks.models.shared_prompts import grouped_logprobs
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.models.tokenization import padded_batch
from creditflow.tasks.recipes.reward_model import PairData
from creditflow.tasks.recipes.rl import RLTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = ["great", "wonderful", "lovely", "happy"]
BAD = ["awful", "terrible", "sad", "grim"]


def _prompt(i: int) -> S.Messages:
    return [{"role": "user", "content": f"How was day {i}?"}]


def good_word_reward(prompts: list[S.Messages], completions: list[str]) -> list[float]:
    """A verifiable reward (``rl.reward_functions``): how many GOOD words the completion has."""
    return [float(sum(text.count(w) for w in GOOD)) for text in completions]


def good_token_credit(rollouts) -> list[np.ndarray]:
    """An ``rl.credit_function``: +1 on each token inside a GOOD word, -1 inside a BAD word."""
    out = []
    for r in rollouts:
        credit = np.zeros(len(r.completion_ids), np.float32)
        for words, sign in ((GOOD, 1.0), (BAD, -1.0)):
            for word in words:
                for found in re.finditer(word, r.text):
                    inside = [s < found.end() and e > found.start() for s, e in zip(r.char_start, r.char_end)]
                    credit[np.array(inside, dtype=bool)] = sign
        out.append(credit)
    return out


def short_credit(rollouts):
    return [[0.0] for _ in rollouts]


def failing_reward(prompts, completions):
    raise KeyError("no answer key")


def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


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


def test_clipped_policy_loss_clips_both_ways_and_passes_no_gradient_through_clipped_tokens():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    old, advantages, mask = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    per_token, clipped = clipped_policy_loss(logp, old, advantages, 0.2, 0.2)
    loss = aggregate_loss(per_token, mask, "dapo", 3)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(0.5, 0.8) = 0.8 (clipped); token 3: -2.2
    assert float(loss.detach()) == pytest.approx((-1.2 + 0.8 - 2.2) / 3) and clipped.tolist() == [[True, True, False]]
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2.2 / 3]]))
    # clip-higher: eps_high 0.6 lets token 1's ratio 1.5 through, the lower clip of token 2 is unchanged
    per_token, clipped = clipped_policy_loss(logp.detach(), old, advantages, 0.2, 0.6)
    torch.testing.assert_close(per_token, torch.tensor([[-1.5, 0.8, -2.2]]))


def test_loss_aggregations_match_hand_computed_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate_loss(per_token, mask, "dapo", 8)) == pytest.approx(10 / 4)  # token mean
    assert float(aggregate_loss(per_token, mask, "grpo", 8)) == pytest.approx((2 + 4) / 2)  # mean of row means
    assert float(aggregate_loss(per_token, mask, "dr_grpo", 8)) == pytest.approx(10 / (2 * 8))  # over B * L
    with pytest.raises(ValueError, match="unknown loss_type"):
        aggregate_loss(per_token, mask, "bnpo", 8)


def test_k3_kl_is_zero_at_equal_policies_positive_elsewhere():
    logp, ref = torch.log(torch.tensor([0.5, 0.25])), torch.log(torch.tensor([0.5, 0.5]))
    # d = log 2: exp(d) - d - 1 = 1 - log 2; sampled from pi_old = 2 pi, each is weighted by 1/2
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([0.0, 1.0 - math.log(2.0)]))
    torch.testing.assert_close(k3_kl(logp, ref, logp + math.log(2.0)), torch.tensor([0.0, 0.5 - math.log(2.0) / 2]))


def test_grpo_advantages_and_dense_credit_match_the_spec_vector():
    # docs/algorithms.md, "GRPO with dense token credit": k = 2, rewards (1, 0), lengths 3 and 2
    scores = torch.tensor([1.0, 0.0])
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    torch.testing.assert_close(group_advantages(scores, 2), torch.tensor([0.5, -0.5]) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(scores, 2, scale=False), torch.tensor([0.5, -0.5]))
    credit = torch.tensor([[0.2, 0.0, 0.4], [-0.2, 0.1, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # the group's 5 tokens: mean 0.1, squared deviations sum to 0.2, unbiased std sqrt(0.2 / 4) = 0.223607
    expected = (torch.tensor([[0.1, -0.1, 0.3], [-0.3, 0.0, 0.0]]) / (math.sqrt(0.2 / 4) + 1e-4)) * mask
    normalized = group_token_credit(credit, mask, 2)
    torch.testing.assert_close(normalized, expected)
    spec = torch.tensor([[0.44701, -0.44701, 1.34104], [-1.34104, 0.0, 0.0]])  # the numbers docs/algorithms.md prints
    torch.testing.assert_close(normalized, spec, atol=1e-5, rtol=0)
    torch.testing.assert_close(group_advantages(scores, 2), torch.tensor([0.70701, -0.70701]), atol=1e-5, rtol=0)
    assert float((normalized * mask).sum()) == pytest.approx(0.0, abs=1e-5)  # it only moves credit between tokens
    torch.testing.assert_close(group_token_credit(torch.ones(2, 3), mask, 2), torch.zeros(2, 3))  # constant: none
    with pytest.raises(ValueError, match="GRPO needs at least 2 samples"):
        group_advantages(scores, 1)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_the_grpo_loss_equals_trl_grpo_trainers_on_the_same_tensors(model_dir, tmp_path, loss_type):
    """TRL 1.16's GRPOTrainer._compute_loss, run on a real trainer and model, against ours on its log-probs."""
    import warnings

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    warnings.filterwarnings("ignore")
    args = GRPOConfig(
        output_dir=str(tmp_path),
        loss_type=loss_type,
        beta=0.1,
        epsilon=0.2,
        epsilon_high=0.28,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=5,
        use_cpu=True,
        report_to=[],
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "How was day 1?"}] * 4),
    )
    torch.manual_seed(0)
    prompt_ids, completion_ids = torch.randint(3, 50, (4, 3)), torch.randint(3, 50, (4, 5))
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones(4, 3, dtype=torch.long), completion_mask], 1)
    with torch.no_grad():  # TRL's own per-token log-probs: the comparison is of the loss math on them
        logp = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention, 5)[0]
    old = logp + 0.3 * torch.randn_like(logp)  # ratios both sides of the clip range
    ref = logp + 0.2 * torch.randn_like(logp)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones(4, 3, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what its training loop sets for a one-step window
    trl_loss = float(trainer._compute_loss(trainer.model, inputs))

    mask = completion_mask.float()
    per_token, _ = clipped_policy_loss(logp, old, advantages[:, None] * mask, 0.2, 0.28)
    ours = aggregate_loss(per_token + 0.1 * k3_kl(logp, ref, old), mask, loss_type, 5)
    assert float(ours) == pytest.approx(trl_loss, rel=1e-4, abs=1e-6)


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
    for algorithm in ("rloo", "rloo_token", "grpo"):
        with pytest.raises(ValueError, match=f"'{algorithm}' needs samples_per_prompt >= 2"):
            RLConfig(algorithm=algorithm, samples_per_prompt=1)
    with pytest.raises(ValueError, match="cannot fill 4 minibatches"):
        RLConfig(batch_size=1, samples_per_prompt=2, minibatches=4)
    with pytest.raises(ValueError, match="reward_model_weight 0 needs reward_functions"):
        RLConfig(reward_model_weight=0.0)
    with pytest.raises(ValueError, match="spreads the RM's score"):
        RLConfig(reward_model_weight=0.0, reward_source="abc", reward_functions=["test_rl:good_word_reward"])
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        RLConfig(reward_functions=["no_colon"])
    # Rollouts come from the policy itself: its log-probs are the untempered, untruncated policy's.
    for knob, value, neutral in (("temperature", 0.7, 1), ("temperature", 0.0, 1), ("top_p", 0.9, 1), ("top_k", 5, 0)):
        with pytest.raises(ValueError, match=rf"sampling\.{knob}\n.*{knob} must be {neutral} \(got {value}\)"):
            RLConfig(sampling={knob: value})
    with pytest.raises(ValueError, match=r"rl.kl_target needs rl.kl_coef > 0"):
        RLConfig(kl_target=6.0, kl_coef=0.0)
    with pytest.raises(ValueError, match=r"clip_range\n.*less than 1"):
        RLConfig(clip_range=1.5)
    spec = RLConfig(reward_functions=["test_rl:good_word_reward", {"function": "m:f", "weight": 2.0}])
    assert [(f.function, f.weight) for f in spec.reward_functions] == [("test_rl:good_word_reward", 1.0), ("m:f", 2.0)]


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


@pytest.fixture(scope="module")
def dpo_dir(tmp_path_factory, model_dir):
    """The policy with perturbed weights, standing in for the policy stage's DPO policy (same tokenizer)."""
    folder = shutil.copytree(model_dir, tmp_path_factory.mktemp("rl_dpo") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "algorithm,overrides",
    [
        ("ppo", {}),
        ("rloo", {}),
        ("rloo_token", {}),
        ("grpo", {"reward_source": "sparse"}),
        ("grpo", {"loss_type": "grpo", "kl_penalty": "loss", "clip_range_high": 0.28}),
    ],
    ids=["ppo", "rloo", "rloo_token", "grpo-sparse", "grpo-abc-k3"],
)
def test_every_trainable_parameter_changes_and_the_first_rollouts_have_zero_kl(
    model_dir, reward_dir, algorithm, overrides
):
    config = _config(algorithm=algorithm, **overrides)
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False)
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


SOURCES = ["sparse", "abc", "contrastive", "abc+contrastive", "dpo_implicit", "function"]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
@pytest.mark.parametrize("source", SOURCES)
def test_each_reward_source_trains_every_parameter_with_its_credit(model_dir, reward_dir, dpo_dir, source, algorithm):
    implicit = {"implicit_model_dir": dpo_dir, "implicit_beta": 0.5} if source == "dpo_implicit" else {}
    function = {"credit_function": "test_rl:good_token_credit"} if source == "function" else {}
    config = _config(reward_source=source, algorithm=algorithm, max_steps=1, **function)
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False, **implicit)
    before = {n: p.detach().clone() for n, p in trainer.trainable.items()}
    first = trainer.train()[0]
    assert not [n for n, p in trainer.trainable.items() if torch.equal(p.detach(), before[n])]
    if source == "sparse":
        assert first["token_credit_sum"] == 0.0
    elif source == "abc":  # the attention spreads exactly r over the tokens
        assert first["token_credit_sum"] == pytest.approx(first["reward"], abs=1e-4)
    else:  # r_hat or the implicit reward add their own per-token signal
        assert first["token_credit_sum"] != pytest.approx(first["reward"], abs=1e-6)


def test_custom_contrastive_templates_score_with_their_own_text(model_dir, reward_dir):
    """rl.contrastive_template custom: the preset's own text scores as the preset does, and swapping the two
    templates negates r_hat (sigma(-x) - 0.5 = -(sigma(x) - 0.5))."""
    better, worse = TEMPLATE_PRESETS["guideline"]
    credits = {}
    for name, templates in (
        ("preset", {"contrastive_template": "guideline"}),
        ("same", {"contrastive_better_template": better, "contrastive_worse_template": worse}),
        ("swapped", {"contrastive_better_template": worse, "contrastive_worse_template": better}),
    ):
        custom = {"contrastive_template": "custom"} if name != "preset" else {}
        config = _config(reward_source="contrastive", max_steps=1, **templates, **custom)
        trainer = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False)
        rewards, _ = _scored(trainer, trainer.rewards, trainer._rollouts(0))
        credits[name] = np.concatenate(rewards.credit)
    assert np.abs(credits["preset"]).max() > 0
    np.testing.assert_array_equal(credits["same"], credits["preset"])
    np.testing.assert_allclose(credits["swapped"], -credits["preset"], atol=1e-6)
    assert _config(
        **{
            "contrastive_template": "custom",
            "contrastive_better_template": better,
            "contrastive_worse_template": worse,
            "reward_source": "contrastive",
        }
    ).cache_fields() == {"better_template_text": better, "worse_template_text": worse}
    with pytest.raises(ValueError, match="rl.contrastive_template custom needs both"):
        _config(contrastive_template="custom", contrastive_better_template=better)
    with pytest.raises(ValueError, match="need rl.contrastive_template: custom"):
        _config(contrastive_better_template=better, contrastive_worse_template=worse)


def _scored(trainer, rewards: TokenRewards, rollouts):
    with torch.no_grad(), trainer.reference() as reference:
        ref = grouped_logprobs(reference, trainer._layout(rollouts))
        return rewards(rollouts, reference, trainer.tokenizer, ref), ref


def test_dpo_implicit_credit_is_beta_times_the_log_ratio_and_the_score_goes_last(model_dir, reward_dir, dpo_dir):
    config = _config(reward_source="dpo_implicit", max_steps=1)
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False, implicit_model_dir=dpo_dir)
    assert trainer.rewards.implicit_beta == 0.1  # no implicit_beta: the caller's (the policy stage's loss.beta)
    rollouts = trainer._rollouts(0)
    rewards, ref = _scored(trainer, trainer.rewards, rollouts)
    dpo = load_reference_model(dpo_dir, trainer.device, torch.float32)
    for i, r in enumerate(rollouts):
        ids, mask = padded_batch([r.prompt_ids + r.completion_ids], trainer.pad_id)
        with torch.no_grad():
            logp = completion_logprobs(dpo, ids, mask, [len(r.prompt_ids)], [len(r.completion_ids)])[0]
        np.testing.assert_allclose(rewards.credit[i], 0.1 * (logp - ref[i]).numpy(), atol=1e-5)
        token_rewards = rewards.token_rewards(i)
        assert token_rewards[-1] == pytest.approx(rewards.credit[i][-1] + rewards.scores[i], abs=1e-5)
    with pytest.raises(ValueError, match="'dpo_implicit' needs a trained DPO policy"):
        RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False)


def test_reward_functions_join_or_replace_the_reward_model(model_dir, reward_dir):
    joined = _config(
        reward_source="sparse", max_steps=1, reward_functions=[{"function": "test_rl:good_word_reward", "weight": 2.0}]
    )
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, joined, progress=False)
    rollouts = trainer._rollouts(0)
    rewards, _ = _scored(trainer, trainer.rewards, rollouts)
    counts = good_word_reward([], [r.text for r in rollouts])
    assert rewards.parts["test_rl:good_word_reward"] == counts
    assert rewards.scores == pytest.approx([m + 2.0 * c for m, c in zip(rewards.parts["reward_model"], counts)])

    alone = _config(reward_source="sparse", reward_model_weight=0.0, reward_functions=["test_rl:good_word_reward"])
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, alone, progress=False)
    assert trainer.rewards.rm is None  # not even loaded
    history = trainer.train()
    assert "reward/reward_model" not in history[0] and "reward/test_rl:good_word_reward" in history[0]


def test_a_credit_function_adds_its_per_token_credit_to_the_sparse_reward(model_dir, reward_dir):
    config = _config(reward_source="function", credit_function="test_rl:good_token_credit", max_steps=1)
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False)
    rollouts = trainer._rollouts(0)
    rewards, _ = _scored(trainer, trainer.rewards, rollouts)
    for i, expected in enumerate(good_token_credit(rollouts)):
        np.testing.assert_array_equal(rewards.credit[i], expected)
        token_rewards = rewards.token_rewards(i)
        np.testing.assert_allclose(token_rewards[:-1], expected[:-1])
        assert token_rewards[-1] == pytest.approx(expected[-1] + rewards.scores[i], abs=1e-6)  # the outcome goes last
    broken = _config(reward_source="function", credit_function="test_rl:short_credit", max_steps=1)
    with pytest.raises(ValueError, match=r"rl.credit_function 'test_rl:short_credit': rollout 0 .* has \d+ tokens"):
        _train(model_dir, reward_dir, broken)
    with pytest.raises(ValueError, match="'function' and rl.credit_function go together"):
        RLConfig(reward_source="function")
    with pytest.raises(ValueError, match="'function' and rl.credit_function go together"):
        RLConfig(reward_source="sparse", credit_function="test_rl:good_token_credit")


@pytest.mark.parametrize(
    "function,message",
    [
        ("test_rl:failing_reward", r"rl.reward_functions\[0\] 'test_rl:failing_reward' raised KeyError"),
        ("test_rl:nan_reward", r"'test_rl:nan_reward' returned nan for completion 0"),
        ("test_rl:no_such_function", r"rl.reward_functions\[0\] 'test_rl:no_such_function': cannot import"),
    ],
)
def test_a_broken_reward_function_is_named(model_dir, reward_dir, function, message):
    config = _config(reward_source="sparse", max_steps=1, reward_functions=[function])
    with pytest.raises((RuntimeError, ValueError), match=message):
        _train(model_dir, reward_dir, config)


def test_old_logprobs_come_from_the_sampling_mode_and_the_first_ratio_is_one_with_lora_dropout(model_dir, reward_dir):
    lora = LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])
    for disable in (True, False):
        trainer = RLTrainer(model_dir, reward_dir, PROMPTS, _config(lora=lora, disable_dropout=disable), progress=False)
        with torch.no_grad():  # as after some updates: LoRA's B starts at 0, which hides its dropout
            for param in [p for name, p in trainer.trainable.items() if "lora_B" in name]:
                param.add_(0.5 * torch.randn_like(param))
        layout = trainer._layout(trainer._rollouts(0))
        with torch.no_grad(), trainer._behaviour_mode():
            old, again = trainer._forward(layout)[0], trainer._forward(layout)[0]
        torch.testing.assert_close(old, again, rtol=0, atol=0)  # eval mode: no dropout noise in pi_old
        assert trainer.model.training  # and back to train mode for the updates
        new = trainer._forward(layout)[0].detach()  # the update's forward, in train mode
        ratio = torch.exp(new - old)[layout.completion_mask.bool()]
        if disable:  # the default: no dropout anywhere, so the first minibatch's ratio is exactly 1
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-6)
        else:  # LoRA dropout 0.05 on in the update's forward: the ratio moves
            assert float((ratio - 1).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["mask", "penalize"])
def test_truncated_rollouts_are_masked_or_penalized(model_dir, reward_dir, mode):
    # max_new_tokens 3: most rollouts stop at the limit, without EOS
    kept = _config(
        reward_source="sparse", max_steps=1, algorithm="grpo", sampling={"max_new_tokens": 3, "batch_size": 4}
    )
    _, keep_history = _train(model_dir, reward_dir, kept)
    first = keep_history[0]
    assert first["truncated_fraction"] > 0
    trainer, history = _train(
        model_dir, reward_dir, kept.model_copy(update={"truncated": mode, "truncation_penalty": 2.0})
    )
    if mode == "penalize":  # the same rollouts (same seeds), each truncated one 2 lower
        assert history[0]["reward"] == pytest.approx(first["reward"] - 2.0 * first["truncated_fraction"], abs=1e-5)
    else:
        truncated = [s["stopped"] is False for s in trainer.samples]
        assert history[0]["reward"] == pytest.approx(first["reward"], abs=1e-6) and any(truncated)
        if all(truncated):  # nothing left to learn from
            assert history[0]["policy_loss"] == 0.0


def test_abc_rewards_reach_tokens_before_the_last_and_nothing_falls_back(model_dir, reward_dir):
    trainer, history = _train(model_dir, reward_dir, _config(reward_source="abc", max_steps=1))
    assert history[0]["abc_fallback_fraction"] == 0.0
    rewards, _ = _scored(trainer, trainer.rewards, trainer._rollouts(1))
    assert rewards.fallbacks == 0
    long = [i for i, x in enumerate(rewards.credit) if len(x) > 1]
    assert long and all(np.any(rewards.credit[i][:-1] != 0.0) for i in long)  # sparse would leave them all 0
    scores = [rewards.scores[i] for i in long]
    assert [float(rewards.credit[i].sum()) for i in long] == pytest.approx(scores, abs=1e-5)
    assert [float(rewards.token_rewards(i).sum()) for i in long] == pytest.approx(scores, abs=1e-5)  # not twice


def test_abc_rollouts_the_reward_model_cannot_see_get_the_sparse_reward_counted_and_warned(
    model_dir, reward_dir, caplog
):
    # max_length 2 holds only the chat template's closing "<|im_end|>\n": no response token survives
    with caplog.at_level(logging.WARNING, logger="creditflow.tasks.recipes.rl"):
        trainer, history = _train(model_dir, reward_dir, _config(reward_source="abc", max_steps=1), rm_max_length=2)
    assert history[0]["abc_fallback_fraction"] == 1.0
    assert "8 of 8 rollouts got the sparse reward" in caplog.text
    rewards, _ = _scored(trainer, trainer.rewards, trainer._rollouts(1))
    assert rewards.fallbacks == len(rewards.scores)
    # Each one's credit is its whole reward on its last token: it sums to the reward, as spread credit does (GRPO
    # normalizes the credit over the group), and PPO's and RLOO's token rewards hold it once.
    for i, score in enumerate(rewards.scores):
        assert not rewards.credit[i][:-1].any() and rewards.credit[i][-1] == pytest.approx(score, abs=1e-6)
        assert rewards.token_rewards(i)[-1] == pytest.approx(score, abs=1e-6)
        assert float(rewards.token_rewards(i).sum()) == pytest.approx(score, abs=1e-6)


def test_abc_refuses_a_reward_model_whose_template_rewrites_the_response(model_dir, reward_dir, tmp_path):
    # Not a response ABC cannot see but a reward model it cannot read: an error, not a silent sparse reward.
    folder = shutil.copytree(reward_dir, tmp_path / "rm")
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | upper")
    tokenizer.save_pretrained(folder)
    trainer = RLTrainer(model_dir, reward_dir, PROMPTS, _config(reward_source="abc"), progress=False)
    ids = trainer.tokenizer("It was great", add_special_tokens=False)["input_ids"]
    rollout = Rollout(PROMPTS[0], trainer._rollouts(0)[0].prompt_ids, ids, *token_spans(trainer.tokenizer, ids))
    rewards = TokenRewards(folder, trainer.config, trainer.device, 512)
    with pytest.raises(ValueError, match="does not render the response text verbatim"):
        _scored(trainer, rewards, [rollout])


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "rloo_token", "grpo"])
def test_a_learnable_reward_rises(model_dir, reward_dir, algorithm):
    config = _config(
        algorithm=algorithm, samples_per_prompt=4, epochs=8, max_steps=16, learning_rate=1e-2, reward_source="sparse"
    )
    _, history = _train(model_dir, reward_dir, config)
    early = np.mean([h["reward"] for h in history[:3]])
    late = np.mean([h["reward"] for h in history[-3:]])
    assert late > early + 0.25, [round(h["reward"], 3) for h in history]


@pytest.mark.parametrize(
    "kl_target,algorithm",
    [(None, "ppo"), (0.5, "ppo"), (0.5, "rloo"), (0.5, "rloo_token"), (0.5, "grpo")],
    ids=["fixed-kl", "adaptive-kl", "rloo", "rloo_token", "grpo"],
)
def test_an_interrupted_run_resumes_exactly(model_dir, reward_dir, tmp_path, kl_target, algorithm):
    # horizon 100: the adaptive coefficient moves ~3% per iteration, so a coefficient not restored shows
    config = _config(
        epochs=3, max_steps=5, save_every=2, warmup_ratio=0.2, kl_target=kl_target, kl_horizon=100, algorithm=algorithm
    )
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
    keys = ("reward", "kl", "policy_loss", *(["value_loss"] if algorithm == "ppo" else []))
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


LORA_DROPOUT = LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"])


class _SeparateBehaviourPass(RLTrainer):
    def _single_step(self) -> bool:
        return False


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_one_step_per_batch_reuses_the_training_forward_for_old_logprobs(model_dir, reward_dir, algorithm):
    """One optimizer step per batch: pi_old is the training forward itself, detached (no second pass), and the run
    is the run a separate behaviour pass gives."""
    config = _config(algorithm=algorithm, minibatches=1)
    fused = RLTrainer(model_dir, reward_dir, PROMPTS, config, progress=False)
    separate = _SeparateBehaviourPass(model_dir, reward_dir, PROMPTS, config, progress=False)
    assert fused._single_step()
    for overrides in (
        {"minibatches": 2},
        {"ppo_epochs": 2},
        {"grad_accum": 2},
        {"disable_dropout": False, "lora": LORA_DROPOUT},
    ):
        assert not RLTrainer._single_step(SimpleNamespace(config=_config(algorithm=algorithm, **overrides)))
    for ours, theirs in zip(fused.train(), separate.train(), strict=True):
        for key in ("reward", "kl", "entropy", "policy_loss", "clip_fraction", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    for name, param in fused.trainable.items():
        # rounding only: the two forwards run with and without autograd, and Adam scales near-zero gradients up
        torch.testing.assert_close(param, separate.trainable[name], rtol=1e-4, atol=1e-5, msg=name)
