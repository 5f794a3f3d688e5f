"""The reference is scored at the precision the policy computes with, so DPO's margin starts at 0.

CPUs train in fp32, so the GPU precisions are emulated here with bf16 weights and CPU bf16 autocast: the same
Precision objects the trainer and the token-reward stage resolve on CUDA.
"""

import logging
import random

import pytest
import torch

from creditflow.flows.config import validate
from creditflow.tasks.config_base import precision_mode
from creditflow.tasks.configs import LoraConfig, PolicyConfig, PreferenceLossConfig, TokenRewardsConfig
from creditflow.tasks.credit.contrastive import encode_contrastive, score_contrastive
from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
from creditflow.tasks.models.precision import Precision, compute_precision, reference_precision
from creditflow.tasks.models.tiny import build_tiny_causal_lm
from creditflow.tasks.models.tokenization import pad_token_id
from creditflow.tasks.recipes.policy import REFERENCE_GAP_TOLERANCE, PolicyTrainer
from creditflow.tasks.train.preference_batches import PolicyExample, SideTokens

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
WORDS = "the quick brown fox jumps over the lazy dog a helpful answer is correct and concise".split()
BF16_PARAMS = Precision(torch.bfloat16, bf16_autocast=True)  # a LoRA or FSDP2 policy on a GPU
BF16_AUTOCAST = Precision(torch.float32, bf16_autocast=True)  # a fully fine-tuned policy on a GPU


@pytest.mark.parametrize(
    "policy, expected",
    [
        ({}, BF16_AUTOCAST),
        ({"lora": {}}, BF16_PARAMS),
        ({"strategy": "fsdp"}, BF16_PARAMS),
        ({"bf16": False, "lora": {}}, Precision(torch.float32)),
    ],
)
def test_auto_scores_the_reference_at_the_policys_precision(policy, expected):
    cfg = validate({"policy": policy})
    trainer_precision = compute_precision(precision_mode(cfg.policy), CUDA)  # what PolicyTrainer computes with
    scored = reference_precision(cfg.token_rewards.dtype, CUDA, cfg.token_rewards.policy_precision)
    assert trainer_precision == scored == expected
    assert reference_precision("auto", CPU, cfg.token_rewards.policy_precision) == Precision(torch.float32)
    assert reference_precision("bfloat16", CUDA) == Precision(torch.bfloat16)  # explicit: plain weights


def test_the_reference_precision_follows_the_policy_even_in_a_config_dumped_before_it_changed():
    """A config dumped with the defaults (bf16-autocast), then given a LoRA policy, scores the reference in bf16."""
    dumped = validate({}).model_dump(mode="json")
    assert dumped["token_rewards"]["policy_precision"] == "bf16-autocast"
    dumped["policy"]["lora"] = {}
    assert validate(dumped).token_rewards.policy_precision == "bf16-params"


@pytest.fixture(scope="module")
def deeper_lm(tmp_path_factory):
    """Four layers of width 128: bf16 against fp32 drifts about 1e-3 nats per token, a 2-layer model less."""
    corpus = [" ".join(WORDS)] * 20
    return build_tiny_causal_lm(tmp_path_factory.mktemp("deeper"), corpus, num_hidden_layers=4, hidden_size=128)


def _examples(folder, scored_at: Precision) -> list[PolicyExample]:
    """Six pairs whose reference log-probs the contrastive scorer computed at ``scored_at``, in batches of 5 (the
    trainer's micro-batches hold 6 rows: other shapes)."""
    rng = random.Random(0)
    prompts = [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}] for _ in range(12)]
    answers = [
        [{"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 30)))}] for _ in range(12)
    ]
    tokenizer = load_tokenizer(str(folder))
    items = encode_contrastive(tokenizer, prompts, answers, TokenRewardsConfig(max_length=256))
    model = load_reference_model(folder, CPU, scored_at.weights)
    with scored_at.autocast(CPU):
        scored = score_contrastive(model, items, 5, pad_token_id(tokenizer))

    def side(i: int) -> SideTokens:
        return SideTokens(items[i].plain_ids, items[i].completion_ids, scored[i].ref_logps.tolist(), None)

    return [PolicyExample(str(i), side(2 * i), side(2 * i + 1)) for i in range(6)]


@pytest.mark.parametrize(
    "policy_precision, lora",
    [(BF16_PARAMS, LoraConfig(dropout=0.1)), (BF16_AUTOCAST, None)],
    ids=["lora-bf16-params", "full-bf16-autocast"],
)
def test_step0_margin_is_zero_only_when_the_reference_matches_the_policys_bf16(
    deeper_lm, caplog, policy_precision, lora
):
    config = PolicyConfig(
        lora=lora, loss=PreferenceLossConfig(alpha=0.0), token_reward_source="none", batch_size=3, max_steps=1
    )
    gaps = {}
    for scored_at in (policy_precision, Precision(torch.float32)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="creditflow.tasks.recipes.policy"):
            trainer = PolicyTrainer(
                deeper_lm, _examples(deeper_lm, scored_at), config, progress=False, precision=policy_precision
            )
            gaps[scored_at] = trainer.reference_gap()
        warned = "not scored at this policy's precision" in caplog.text
        assert warned == (scored_at != policy_precision)
    matched, fp32_reference = gaps[policy_precision], gaps[Precision(torch.float32)]
    # Scored at the policy's precision: only other batch shapes separate them (LoRA dropout is off for the check).
    # How far depends on the CPU's bf16 kernels: under 5e-5 nats per token with AVX2, 1.0e-4 to 1.3e-4 with native
    # AVX-512 BF16, where the fp32 reference's gap is 1.2e-3 to 1.5e-3.
    assert matched["step0_logp_gap"] < REFERENCE_GAP_TOLERANCE / 3 and matched["step0_max_abs_z"] < 1e-3
    # The fp32 reference the old `auto` stored for these policies: the bug this guards against.
    assert fp32_reference["step0_logp_gap"] > REFERENCE_GAP_TOLERANCE


def test_the_first_step_logs_the_gap(deeper_lm):
    config = PolicyConfig(loss=PreferenceLossConfig(alpha=0.0), token_reward_source="none", batch_size=3, max_steps=2)
    history = PolicyTrainer(deeper_lm, _examples(deeper_lm, Precision(torch.float32)), config, progress=False).train()
    assert history[0]["step0_logp_gap"] < 1e-5  # fp32 on CPU, as the token-reward stage scores there
    assert "step0_logp_gap" not in history[1]
