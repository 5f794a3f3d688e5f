"""The credit gym's plumbing (tasks/credit/gym.py): each task's truth by hand, the truth on real tokens, the audit's
paired score of the oracle and its controls, every source's rows aligned with the tokens, and the constant source
training exactly as DPO does. The experiment itself is bench/credit_gym.py."""

import numpy as np
import pytest
import torch

from creditflow.tasks.configs import PolicyConfig
from creditflow.tasks.credit import gym
from creditflow.tasks.credit.rl_rewards import Rollout
from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
from creditflow.tasks.models.tiny import build_tiny_causal_lm
from creditflow.tasks.recipes.policy import PolicyTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_walk_truth_follows_the_responses_own_terms():
    assert gym.answer("walk c: 1 3 2 2 1") == "d g i k l"
    slipped = gym.judge("walk c: 1 3 2 2 1", "d h j l m")  # slips at term 2, then follows the rule from its own terms
    assert slipped.right == [True, False, True, True, True] and slipped.errors == 1
    assert gym.judge("walk y: 3 1 1 1 1", "b c d e f").errors == 0  # mod 26
    short = gym.judge("walk c: 1 3 2 2 1", "d g i")
    assert short.right == [True, True, True] and short.missing == 2 and short.errors == 2
    long = gym.judge("walk c: 1 3 2 2 1", "d g i k l m")
    assert long.right[-1] is False and long.errors == 1  # an extra term is wrong


def test_shift_errors_stay_local():
    assert gym.answer("shift 3: a q z m b") == "d t c p e"
    wrong = gym.judge("shift 3: a q z m b", "d u c p e")
    assert wrong.right == [True, False, True, True, True] and wrong.errors == 1
    with pytest.raises(ValueError, match="not a shift prompt"):
        gym.judge("shift x: a", "b")


def test_corruptions_always_err_and_samples_are_well_formed():
    rng = gym.seeded(0, 0)
    for task in gym.TASKS.values():
        for _ in range(50):
            prompt = task.sample(rng)
            assert gym.judge(prompt, gym.answer(prompt)).errors == 0
            assert gym.judge(prompt, " ".join(task.corrupt(prompt, rng, 0.3))).errors >= 1


def test_the_paired_slot_score_and_its_bounds():
    assert gym.paired_slot_score([0.4, 0.1], [-0.4, 0.0]) == 1.0
    assert gym.paired_slot_score([-0.4, 0.0], [0.4, 0.1]) == 0.0
    assert gym.paired_slot_score([0.2, 0.2], [0.2, 0.2]) == 0.5  # ties count half
    with pytest.raises(ValueError, match="one right and one wrong score per item"):
        gym.paired_slot_score([0.1], [])


# ---------------------------------------------------------------------------------------------------------
# A tiny gym world, seconds on CPU


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    task = gym.TASKS["shift"]
    examples = gym.corrupted_dataset(task, 60, gym.seeded(0, 1))
    corpus = [text for turn, answer in examples for text in (turn[0]["content"], answer)]
    folder = build_tiny_causal_lm(tmp_path_factory.mktemp("gym") / "sft", corpus, seed=0)
    losses = gym.train_sft(folder, examples, steps=40, seed=0)
    tokenizer = load_tokenizer(str(folder))
    reference = load_reference_model(folder, torch.device("cpu"), torch.float32)
    rng = gym.seeded(0, 5)
    prompts = list(dict.fromkeys(task.sample(rng) for _ in range(24)))[:12]
    groups = gym.sample_responses(reference, tokenizer, prompts, 4, seed=0)
    gym.with_reference_logprobs(reference, tokenizer, [r for group in groups for r in group])
    pairs = gym.build_pairs(groups, "best_vs_worst", gym.seeded(0, 2))
    items = []
    for prompt in prompts[:6]:
        right, wrong, slot = gym.slip(prompt, rng)
        items.append((gym.given_response(tokenizer, prompt, right), gym.given_response(tokenizer, prompt, wrong), slot))
    return {
        "folder": folder,
        "tokenizer": tokenizer,
        "reference": reference,
        "pairs": pairs,
        "items": items,
        "losses": losses,
    }


def test_sft_learns_and_pairs_are_labelled_by_their_true_errors(world):
    assert np.mean(world["losses"][-5:]) < np.mean(world["losses"][:5])
    assert world["pairs"] and all(w.errors < l_.errors for w, l_ in world["pairs"])


def test_token_truth_lands_on_the_tokens_of_each_term(world):
    response = gym.given_response(world["tokenizer"], "shift 3: a q z m b", "d u c p e")
    truth = response.truth
    assert len(truth) == len(response.ids) and response.stopped and truth[-1] == 1.0  # EOS: all 5 terms there
    wrong = [t for t, (s, e) in enumerate(zip(response.char_start, response.char_end)) if s < 3 and e > 2]  # "u"
    assert wrong and all(truth[t] == -1.0 for t in wrong)
    assert truth[(truth != 0)].tolist().count(-1.0) == len(wrong)


def test_the_rl_credit_functions_are_the_oracle_on_each_rollouts_tokens(world):
    responses = [r for pair in world["pairs"][:4] for r in pair]
    rollouts = [
        Rollout(gym.messages(r.prompt), r.prompt_ids, r.ids, r.text, r.char_start, r.char_end, not r.stopped)
        for r in responses
    ]
    oracle, inverted = gym.oracle_credit(rollouts), gym.inverted_credit(rollouts)
    signs, again = gym.random_sign_credit(rollouts), gym.random_sign_credit(rollouts)
    for response, o, i, s, a in zip(responses, oracle, inverted, signs, again):
        np.testing.assert_array_equal(o, gym.ORACLE_SCALE * response.truth)
        np.testing.assert_array_equal(i, -o)
        np.testing.assert_array_equal(np.abs(s), np.abs(o))  # the oracle's positions ...
        np.testing.assert_array_equal(s, a)  # ... with signs fixed by the rollout itself
    flipped = np.concatenate([np.sign(s) != np.sign(o) for s, o in zip(signs, oracle)])
    assert 0 < flipped.mean() < 1  # some signs kept, some flipped: no information


def _sources(world):
    reference, tokenizer = world["reference"], world["tokenizer"]
    return {
        "oracle_dense": gym.oracle_dense,
        "oracle_sparse": gym.oracle_sparse,
        "random_signs": gym.random_signs(0),
        "inverted": gym.inverted_oracle,
        "constant": gym.constant,
        **gym.contrastive_sources(reference, tokenizer),
        "dpo_implicit": gym.dpo_implicit(reference, reference, tokenizer),
    }


def test_every_source_gives_one_bounded_reward_per_token(world):
    for name, source in _sources(world).items():
        rewards = source(world["pairs"])
        assert len(rewards) == len(world["pairs"]), name
        for (chosen, rejected), (r_chosen, r_rejected) in zip(world["pairs"], rewards):
            assert len(r_chosen) == len(chosen.ids) and len(r_rejected) == len(rejected.ids), name
            assert np.all(np.abs(np.concatenate([r_chosen, r_rejected])) < 0.5), name


def test_the_audit_scores_the_oracle_1_the_inverted_oracle_0_and_a_label_reader_one_half(world):
    sources = _sources(world)
    assert gym.audit_score(sources["oracle_dense"], world["items"]) == 1.0
    assert gym.audit_score(sources["oracle_sparse"], world["items"]) == 1.0
    assert gym.audit_score(sources["inverted"], world["items"]) == 0.0
    assert gym.audit_score(sources["constant"], world["items"]) == 0.5  # it only knows which side is chosen
    assert gym.audit_score(sources["dpo_implicit"], world["items"]) == 0.5  # pi == pi_ref: no signal, all ties


def _trained(world, source, alpha: float, rpo_alpha: float = 0.0) -> dict[str, torch.Tensor]:
    config = PolicyConfig.model_validate(
        {
            "learning_rate": 1e-3,
            "loss": {"beta": 0.1, "alpha": alpha, "rpo_alpha": rpo_alpha},
            "token_reward_source": "contrastive" if alpha else "none",
            "batch_size": 4,
            "epochs": 2,
            "warmup_ratio": 0.0,
            "max_grad_norm": None,
            "length_grouped": False,
        }
    )
    rewards = source(world["pairs"]) if alpha else None
    trainer = PolicyTrainer(world["folder"], gym.policy_examples(world["pairs"], rewards), config, progress=False)
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.trainable.items()}


def test_the_constant_source_trains_exactly_as_dpo_and_the_oracle_and_nll_do_not(world):
    before = {
        n: p.detach().clone() for n, p in load_reference_model(world["folder"], "cpu", torch.float32).named_parameters()
    }
    dpo = _trained(world, None, 0.0)
    constant = _trained(world, gym.constant, 2.0)  # every pair's gradient x (1 + 2 * 0.4): Adam does not see it
    update = torch.cat([(dpo[n] - before[n]).flatten() for n in dpo]).abs()
    gap = torch.cat([(constant[n] - dpo[n]).flatten() for n in dpo]).abs()
    # Equal up to Adam's eps (1e-8 next to sqrt(v)): it shows only on the embedding rows of tokens that are rare in
    # the pairs, whose second moments are that small.
    assert float((gap <= 1e-5).float().mean()) > 0.99 and float(gap.max()) < 0.05 * float(update.max())
    for other in (_trained(world, gym.oracle_dense, 2.0), _trained(world, None, 0.0, rpo_alpha=1.0)):
        assert any(not torch.allclose(other[n], dpo[n], atol=1e-4) for n in dpo)


def test_the_exact_answer_probability_and_the_sampled_error_rate(world):
    reference, tokenizer = world["reference"], world["tokenizer"]
    prompts = [w.prompt for w, _ in world["pairs"]]
    exact = gym.exact_answer_prob(reference, tokenizer, prompts)
    errors = gym.sampled_error_rate(reference, tokenizer, prompts, seed=3)
    assert 0.0 < exact < 1.0 and 0.0 <= errors <= 1.0
    assert gym.sampled_error_rate(reference, tokenizer, prompts, seed=3) == errors  # seeded
    assert gym.exact_match_reward([gym.messages("walk c: 1 3 2 2 1")] * 2, ["d g i k l", "d g i k m"]) == [1.0, 0.0]
