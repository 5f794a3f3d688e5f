"""Policy trainer: training-time log-probs, DPO/SimPO with T-REG on a tiny model, resume, refusal of misaligned
token ids, LoRA, two-process DDP, and the stage entry point.

The token-reward table is built here with the reference model (``logprobs.completion_logprobs``) and
``encode_pair``, in the token-reward stage's schema, so these tests do not depend on that stage.
"""

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import Interrupt, pair_row, stop_at
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from creditflow.flows.config import ConfigError, load_config
from creditflow.flows.registry import STAGES
from creditflow.flows.stages import missing_outputs
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace
from creditflow.tasks.configs import LoraConfig, PolicyConfig, PreferenceLossConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.models.causal_lm import trained_model_folder
from creditflow.tasks.models.loading import disable_dropout, load_policy_model, load_tokenizer
from creditflow.tasks.models.logprobs import completion_logprobs, training_logprobs
from creditflow.tasks.models.packing import pack_layout
from creditflow.tasks.models.precision import REFERENCE_PRECISION_FILE
from creditflow.tasks.models.tiny import build_tiny_causal_lm
from creditflow.tasks.models.tokenization import completion_offsets, encode_pair
from creditflow.tasks.recipes.policy import PolicyTrainer, compute_policy, launch_distributed
from creditflow.tasks.recipes.token_rewards import OUTPUT_SCHEMA
from creditflow.tasks.stage import StageContext
from creditflow.tasks.train.optim import cosine_schedule
from creditflow.tasks.train.preference_batches import SHAPE_BUCKET, build_examples, collate, epoch_batches

GOOD = ["great", "wonderful", "lovely", "happy", "excellent", "bright"]
BAD = ["awful", "terrible", "sad", "horrible", "boring", "grim"]
KNOBS = {"max_length": 64, "max_prompt_length": 32, "truncation": "keep_start"}
CPU = torch.device("cpu")


def _pair(i: int, split: str = "train") -> dict:
    prompt = [{"role": "user", "content": f"How was day {i}?"}]
    # Lengths vary from pair to pair, so batches are padded and length grouping matters.
    chosen = [{"role": "assistant", "content": "It was " + " and ".join(GOOD[(i + k) % 6] for k in range(1 + i % 3))}]
    rejected = [{"role": "assistant", "content": f"It was {BAD[i % 6]}" + " indeed" * (i % 4) + "."}]
    return pair_row(prompt, chosen, rejected, i, split)


def _token_rewards(model_dir, pairs: list[dict], abc: bool = False) -> pa.Table:
    """The token-reward stage's output for ``pairs``: r_hat = +0.3 on every chosen token and -0.3 on every rejected
    one (a clean signal), reference log-probs from the reference model itself.

    ``abc`` adds rows on another tokenization (one token per character) carrying the same per-side reward sum, as
    ABC rows live on the reward model's tokens.
    """
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = []
    for pair in pairs:
        for side, value in (("chosen", 0.3), ("rejected", -0.3)):
            prompt_ids, completion_ids = encode_pair(tokenizer, pair["prompt"], pair[side], *KNOBS.values())
            ids = torch.tensor([prompt_ids + completion_ids])
            ref = completion_logprobs(model, ids, torch.ones_like(ids), [len(prompt_ids)], [len(completion_ids)])[0]
            spans = completion_offsets(tokenizer, [pair[side]])[0][: len(completion_ids)]
            rows.append(
                {
                    "source": "contrastive",
                    "token_ids": completion_ids,
                    "char_start": [a for a, _ in spans],
                    "char_end": [b for _, b in spans],
                    "rewards": [value] * len(completion_ids),
                    "ref_logps": ref.tolist(),
                }
            )
            text = S.completion_text(pair[side])
            if abc:
                rows.append(
                    {
                        "source": "abc",
                        "token_ids": [ord(c) for c in text],
                        "char_start": list(range(len(text))),
                        "char_end": list(range(1, len(text) + 1)),
                        "rewards": [value / len(text)] * len(text),
                        "ref_logps": None,
                    }
                )
            for row in rows[-2 if abc else -1 :]:
                row.update(pair_id=pair["pair_id"], side=side, n_tokens=len(row["token_ids"]))
                row["key"] = f"{pair['pair_id']}-{side}-{row['source']}"
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    corpus = [S.completion_text(p[k]) for p in map(_pair, range(40)) for k in ("prompt", "chosen", "rejected")]
    return build_tiny_causal_lm(tmp_path_factory.mktemp("policy_base"), corpus * 3, seed=0)


def _data(model_dir):
    """(pairs table, token-reward table with contrastive and abc rows) for 24 train pairs."""
    pairs = [_pair(i) for i in range(24)]
    return S.rows_to_table(pairs, S.PAIRS_SCHEMA), _token_rewards(model_dir, pairs, abc=True)


@pytest.fixture(scope="module")
def data(model_dir):
    return _data(model_dir)


@pytest.fixture(scope="module")
def examples(model_dir, data):
    return _examples(model_dir, data, "contrastive")


def _examples(model_dir, data, source):
    return build_examples(load_tokenizer(str(model_dir)), *data, source, **KNOBS)


def _config(**overrides) -> PolicyConfig:
    settings = dict(
        loss=PreferenceLossConfig(loss_type="dpo", beta=0.1, alpha=0.5),
        learning_rate=3e-3,
        warmup_ratio=0.0,
        epochs=2,
        batch_size=4,
        grad_accum=2,
        save_every=1000,
        chunk_size=16,
    )
    settings.update(overrides)
    return PolicyConfig(**settings)


def _train(model_dir, examples, config, **kwargs):
    trainer = PolicyTrainer(model_dir, examples, config, progress=False, **kwargs)
    return trainer, trainer.train()


def _margins(model, examples, beta: float = 0.1) -> torch.Tensor:
    """DPO implicit reward margins β[(ℓ_w − ℓ^ref_w) − (ℓ_l − ℓ^ref_l)] of every pair under ``model``."""
    batch = collate(examples, 0, CPU)
    with torch.no_grad():
        flat = training_logprobs(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
    logp = flat.new_zeros(batch.mask.shape).index_put((batch.sides, batch.index), flat)
    ratio = ((logp - batch.ref_logps) * batch.mask).sum(-1)
    return beta * (ratio[: len(examples)] - ratio[len(examples) :])


# ---------------------------------------------------------------------------------------------------------
# Log-probs with gradients


def _naive_logprobs(model, batch) -> torch.Tensor:
    logps = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1)
    return logps[batch.rows, batch.cols - 1].gather(-1, batch.input_ids[batch.rows, batch.cols][:, None])[:, 0]


def test_training_logprobs_equal_naive_in_value_and_gradient(model_dir, examples):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = collate(examples[:5], 0, CPU)
    weights = torch.randn(len(batch.rows), generator=torch.Generator().manual_seed(0))
    results = []
    for compute in (
        lambda: training_logprobs(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols, 7),
        lambda: _naive_logprobs(model, batch),
    ):
        model.zero_grad()
        values = compute()
        (weights * values).sum().backward()
        results.append((values.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused, fused_grads), (naive, naive_grads) = results
    assert len(fused) == int(batch.mask.sum()) > 7 * 3  # several LM-head chunks
    assert torch.all(fused < 0)
    assert torch.allclose(fused, naive, atol=1e-5, rtol=0)
    for name, grad in naive_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(fused_grads[name], grad, atol=1e-6, rtol=1e-4), name


def test_training_logprobs_keep_no_vocabulary_sized_tensor_for_backward(model_dir, examples):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    vocab = model.config.vocab_size
    batch = collate(examples[:4], 0, CPU)
    saved = {"fused": [], "naive": []}
    for name, compute in (
        ("fused", lambda: training_logprobs(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols, 8)),
        ("naive", lambda: _naive_logprobs(model, batch)),
    ):
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, n=name: saved[n].append(tuple(t.shape)) or t, lambda t: t
        ):
            compute().sum().backward()
    assert any(shape[-1] == vocab for shape in saved["naive"])  # the naive path keeps [.., V] logits
    assert not any(shape and shape[-1] == vocab for shape in saved["fused"])


# ---------------------------------------------------------------------------------------------------------
# Training


def test_config_validation():
    with pytest.raises(ValueError, match="'none' needs loss.alpha == 0"):
        PolicyConfig(loss=PreferenceLossConfig(alpha=0.1), token_reward_source="none")
    with pytest.raises(ValueError, match="token_reward_source"):
        PolicyConfig(token_reward_source="oracle")
    with pytest.raises(ValueError, match="grad_accum"):
        PolicyConfig(grad_accum=0)
    for bad in ({"learning_rate": 0.0}, {"learning_rate": float("inf")}, {"warmup_ratio": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PolicyConfig(**bad)
    config = _config(lora=LoraConfig(r=2, target_modules=["q_proj"]))
    # The torchrun worker receives the config as JSON.
    assert PolicyConfig.model_validate(json.loads(json.dumps(config.model_dump()))) == config


def test_cosine_schedule_warms_up_from_a_nonzero_rate_then_follows_transformers():
    from transformers import get_cosine_schedule_with_warmup

    lrs = []
    for make in (cosine_schedule, get_cosine_schedule_with_warmup):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        scheduler = make(optimizer, 3, 10)
        lrs.append([])
        for _ in range(12):
            lrs[-1].append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
    assert lrs[0][:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # the first step runs at peak / (warmup + 1), not 0
    assert lrs[1][0] == 0.0  # transformers' first step would not move the weights
    assert lrs[0][3:] == pytest.approx(lrs[1][3:], abs=1e-12) and lrs[0][10] == 0.0  # the same cosine decay
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    assert cosine_schedule(optimizer, 0, 10).get_last_lr()[0] == 2.0  # no warmup: the peak at once


def test_dropout_is_off_in_the_policy_so_step_zero_is_the_reference(tmp_path, examples):
    from creditflow.tasks.models.tiny import build_tiny_causal_lm

    corpus = [S.completion_text(p[k]) for p in map(_pair, range(40)) for k in ("prompt", "chosen", "rejected")]
    noisy = build_tiny_causal_lm(tmp_path / "noisy", corpus * 3, seed=0, attention_dropout=0.5)
    model, _ = load_policy_model(noisy, _config(), CPU)
    assert model.training
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    _, history = _train(noisy, _examples(noisy, _data(noisy), "contrastive"), _config(max_steps=1))
    assert history[0]["sequence_loss"] == pytest.approx(math.log(2), abs=1e-6)  # z = 0: log π = log π_ref


def test_dropout_off_covers_functional_dropout_read_from_config_floats():
    """OPT's layers apply F.dropout with a float copied from the config (`dropout`, `activation_dropout`), which no
    nn.Dropout module holds: in train mode, two forwards must still agree."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64,
        hidden_size=16,
        word_embed_proj_dim=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        dropout=0.3,
        attention_dropout=0.3,
        activation_dropout=0.3,
    )
    torch.manual_seed(0)
    model = OPTForCausalLM(config).train()
    ids = torch.randint(0, 64, (2, 10))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # the control: dropout is on
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert model.config.dropout == model.config.activation_dropout == 0.0


def test_length_grouping_cuts_padding_and_keeps_every_pair(examples):
    lengths = [e.length for e in examples]
    for grouped in (False, True):
        batches = epoch_batches(lengths, 4, seed=0, epoch=0, length_grouped=grouped)
        assert sorted(i for b in batches for i in b) == list(range(len(examples)))
    padding = {
        grouped: sum(
            len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
            for b in epoch_batches(lengths, 4, 0, 0, grouped)
        )
        for grouped in (False, True)
    }
    assert padding[True] < padding[False]
    assert epoch_batches(lengths, 4, 0, 1, True) != epoch_batches(lengths, 4, 0, 0, True)  # reshuffled per epoch
    assert len(epoch_batches(lengths, 5, 0, 0, True, world=2)) == 4  # 5 micro-batches cut to a multiple of 2


def test_dpo_treg_changes_every_parameter_and_learns_the_preferences(model_dir, examples):
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    assert _margins(before, examples).abs().max() < 1e-5  # the policy starts as the reference (batching rounding)
    steps = []
    trainer, history = _train(model_dir, examples, _config(epochs=3), on_step=lambda s, m: steps.append(s))
    assert steps == list(range(1, 10)) and len(history) == 9  # 24 pairs / (4 x 2) per step x 3 epochs
    initial = dict(before.named_parameters())
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p.detach(), initial[n].detach())]
    assert unchanged == []
    margins = _margins(trainer.model, examples)
    assert (margins > 0).float().mean() > 0.9
    assert history[-1]["rewards_accuracy"] > 0.9 and history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["token_reward_corr"] > 0.3  # the implicit token reward follows r_hat's sign
    first = history[0]
    assert first["sequence_loss"] == pytest.approx(math.log(2), abs=1e-6)  # z = 0 before the first update
    assert first["mean_w"] == pytest.approx(0.5, abs=1e-6)
    assert first["loss"] == pytest.approx(first["sequence_loss"] + 0.5 * 0.5 * first["regularizer"], rel=1e-5)
    assert all(h["tokens_per_s"] > 0 and h["peak_memory_gb"] > 0.1 and h["grad_norm"] > 0 for h in history)


def test_simpo_with_treg_runs_and_separates_pairs(model_dir, examples):
    loss = PreferenceLossConfig(loss_type="simpo", beta=2.0, gamma=0.5, alpha=0.25)
    trainer, history = _train(model_dir, examples, _config(loss=loss, epochs=3))
    assert history[0]["rewards_margin"] < history[-1]["rewards_margin"]
    assert history[-1]["rewards_accuracy"] > 0.9
    assert all(math.isfinite(h["loss"]) and h["regularizer"] != 0 for h in history)


def test_pack_layout_fills_rows_first_fit_decreasing():
    lengths = [5, 9, 3, 7, 2]
    one_row = pack_layout(lengths, multiple=8)
    assert one_row.n_rows == 1 and one_row.width == 32  # 26 tokens, rounded up to 8
    assert sorted(zip(one_row.starts, lengths)) == [(0, 9), (9, 7), (16, 5), (21, 3), (24, 2)]  # longest first
    budget = pack_layout(lengths, budget=10)
    assert budget.n_rows == 3 and budget.width == 10  # [9] [7 3] [5 2]
    for row in range(budget.n_rows):
        spans = sorted((s, s + n) for s, n, r in zip(budget.starts, lengths, budget.rows) if r == row)
        assert spans[-1][1] <= 10 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no overlap
    assert pack_layout([12, 3], budget=10).rows == [0, 1]  # too long for the budget: a row of its own


@pytest.mark.parametrize("budget", [None, 64], ids=["one-row", "budget-64"])
def test_packed_logprobs_equal_padded_in_value_and_gradient(model_dir, examples, budget):
    """Per-sequence log-probs of packed rows (SDPA's block mask from the position ids) equal the padded path's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    results = []
    for packing in (False, True):
        batch = collate(examples[:6], 0, CPU, packing=packing, packing_tokens=budget)
        model.zero_grad()
        flat = training_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols, 16, batch.position_ids
        )
        logp = flat.new_zeros(batch.mask.shape).index_put((batch.sides, batch.index), flat)
        (logp * batch.mask).sum().backward()
        results.append((batch, logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, padded_logp, padded_grads), (packed, packed_logp, packed_grads) = results
    assert packed.attention_mask is None and packed.tokens == padded.tokens == int(padded.attention_mask.sum())
    if budget:
        assert packed.input_ids.shape[0] > 1 and packed.input_ids.shape[1] <= budget
    else:
        assert packed.input_ids.numel() == packed.tokens  # one row, not one pad token
    assert torch.allclose(packed_logp, padded_logp, atol=1e-5, rtol=0)
    for name, grad in padded_grads.items():
        assert torch.allclose(packed_grads[name], grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_flex_attention_block_mask_keeps_packed_sequences_apart(model_dir, examples):
    """The GPU kernel's path: transformers turns the position ids into a flex_attention BlockMask. CPUs run its
    forward only (no backward), unfused."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="flex_attention").eval()
    padded, packed = (collate(examples[:4], 0, CPU, packing=packing) for packing in (False, True))
    with torch.no_grad():
        values = [
            training_logprobs(model, b.input_ids, b.attention_mask, b.rows, b.cols, 16, b.position_ids)
            for b in (padded, packed)
        ]
    assert torch.allclose(values[0], values[1], atol=1e-5, rtol=0)


def test_packed_training_follows_the_padded_loss_curve_treg_included(model_dir, examples):
    _, padded = _train(model_dir, examples, _config(max_steps=3))
    trainer, packed = _train(model_dir, examples, _config(max_steps=3, packing=True, packing_tokens=64))
    assert packed[0]["regularizer"] != 0  # T-REG's term is in the loss
    for name in ("loss", "sequence_loss", "regularizer", "token_reward_corr"):
        first = 1 if name == "token_reward_corr" else 0  # at step 0 the implicit rewards are 0 up to rounding
        assert [h[name] for h in packed[first:]] == pytest.approx(
            [h[name] for h in padded[first:]], rel=1e-4, abs=1e-5
        ), name
    assert [h["step0_logp_gap"] for h in (packed[0], padded[0])] == pytest.approx([0, 0], abs=1e-5)


@pytest.mark.slow
def test_compiled_training_follows_the_eager_loss_curve(model_dir, examples):
    """compile: true compiles the decoder over widths bucketed to 64 (a handful of shapes): the same losses."""
    _, eager = _train(model_dir, examples, _config(max_steps=3))
    trainer, compiled = _train(model_dir, examples, _config(max_steps=3, compile=True))
    assert trainer.pad_multiple == SHAPE_BUCKET
    for name in ("loss", "sequence_loss", "regularizer"):
        assert [h[name] for h in compiled] == pytest.approx([h[name] for h in eager], rel=1e-4, abs=1e-5), name


def test_gradient_checkpointing_changes_memory_not_results(model_dir, examples):
    plain, plain_history = _train(model_dir, examples, _config(max_steps=2))
    checkpointed, history = _train(model_dir, examples, _config(max_steps=2, gradient_checkpointing=True))
    assert checkpointed.lm.is_activation_checkpointing and not plain.lm.is_activation_checkpointing
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in plain_history], abs=1e-6)
    for (name, a), b in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_alpha_zero_equals_no_token_rewards_bit_for_bit(model_dir, data, examples):
    plain = PreferenceLossConfig(loss_type="dpo", beta=0.1, alpha=0.0)
    with_rewards, history_a = _train(model_dir, examples, _config(loss=plain, max_steps=4))
    bare = _examples(model_dir, data, "none")
    assert bare[0].chosen.rewards is None
    without, history_b = _train(model_dir, bare, _config(loss=plain, max_steps=4, token_reward_source="none"))
    for (name, a), b in zip(with_rewards.model.state_dict().items(), without.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in history_a] == [h["loss"] for h in history_b]
    assert "token_reward_corr" in history_a[0] and "token_reward_corr" not in history_b[0]


def test_interrupted_run_resumes_to_the_same_weights_and_curve(model_dir, examples, tmp_path):
    config = _config(epochs=3, save_every=2, warmup_ratio=0.2, grad_accum=1, weight_decay=0.01)
    straight, straight_history = _train(model_dir, examples, config)

    checkpoints = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        _train(model_dir, examples, config, checkpoint_dir=checkpoints, on_step=stop_at(7))
    assert torch.load(checkpoints / "state.pt", weights_only=True)["step"] == 6
    assert set(load_file(checkpoints / "trainable.safetensors")) == {n for n, _ in straight.model.named_parameters()}
    steps = []
    resumed, history = _train(
        model_dir, examples, config, checkpoint_dir=checkpoints, on_step=lambda s, m: steps.append(s)
    )
    assert resumed.resumed_from == 6 and steps == list(range(7, 19))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert [h["step"] for h in history] == list(range(1, 19))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in straight_history], abs=1e-6)

    with pytest.raises(ValueError, match="checkpoint of another run"):
        PolicyTrainer(model_dir, examples, _config(epochs=4, save_every=2), checkpoint_dir=checkpoints)


def test_mismatched_token_ids_are_refused(model_dir, data):
    pairs, table = data
    rows = table.to_pylist()
    victim = next(i for i, r in enumerate(rows) if r["side"] == "rejected" and r["source"] == "contrastive")
    ids, pair_id = rows[victim]["token_ids"], rows[victim]["pair_id"]
    rows[victim]["token_ids"] = ids[:2] + [ids[2] + 1] + ids[3:]
    broken = pa.Table.from_pylist(rows, schema=table.schema)
    with pytest.raises(ValueError, match=rf"pair {pair_id} \(rejected\): stored token ids differ .* position 2 "):
        _examples(model_dir, (pairs, broken), "contrastive")
    rows[victim]["token_ids"] = ids[:-1]
    expected = rf"position {len(ids) - 1} \(stored end of sequence, encode_pair {ids[-1]}; {len(ids) - 1} vs {len(ids)}"
    with pytest.raises(ValueError, match=expected):
        _examples(model_dir, (pairs, pa.Table.from_pylist(rows, schema=table.schema)), "contrastive")
    # Other truncation knobs than the token-reward stage's give other ids: refused the same way.
    with pytest.raises(ValueError, match="stored token ids differ"):
        build_examples(load_tokenizer(str(model_dir)), pairs, table, "contrastive", 12, 8, "keep_start")
    no_contrastive = table.filter(pc.equal(table["source"], "abc"))
    with pytest.raises(ValueError, match="must include 'contrastive'"):
        _examples(model_dir, (pairs, no_contrastive), "abc")


def test_abc_rewards_become_centered_bounded_rewards_on_policy_tokens(model_dir, data):
    """The abc rows carry r = +0.3 (chosen) and −0.3 (rejected): standardized, z = ±1, so every chosen token gets
    σ(T·a_t) − 0.5 > 0 and every rejected one the mirror, all inside (−0.5, 0.5)."""
    examples = _examples(model_dir, data, "abc")
    for example in examples[:5]:
        for side, sign in ((example.chosen, 1), (example.rejected, -1)):
            rewards = np.array(side.rewards)
            assert len(rewards) == len(side.completion_ids)
            assert (np.sign(rewards[rewards != 0]) == sign).all() and (np.abs(rewards) < 0.5).all()
    _, history = _train(model_dir, examples, _config(token_reward_source="abc", max_steps=2))
    assert all(math.isfinite(h["loss"]) for h in history)


def test_lora_trains_only_adapters_merges_and_saves_a_peft_adapter(model_dir, examples, tmp_path):
    from peft import PeftModel

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    config = _config(lora=lora, max_steps=6, learning_rate=1e-2)
    model, _ = load_policy_model(model_dir, config, CPU)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer, history = _train(model_dir, examples, config)
    assert abs(history[0]["rewards_margin"]) < 1e-6  # lora_B starts at zero: the first step sees the reference
    assert history[-1]["rewards_margin"] > 0.05 and history[-1]["rewards_accuracy"] > 0.9
    trainer.save_pretrained(tmp_path / "merged", tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    changed = {n for n, t in merged.state_dict().items() if not torch.equal(t, base[n])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    assert not any("lora" in n for n in merged.state_dict())
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    # The adapter alone, on a fresh base, is the same network as the merged weights.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter").eval()
    ids = torch.tensor([examples[0].chosen.prompt_ids + examples[0].chosen.completion_ids])
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged.eval()(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # the slowest test here: two torchrun workers each import torch and transformers
def test_two_process_ddp_matches_one_process_with_accumulation(model_dir, examples, tmp_path):
    # Both take the same 4 micro-batches per step (the last step of an epoch takes the 2 left), so they must agree.
    single, single_history = _train(model_dir, examples, _config(grad_accum=4, learning_rate=1e-3))
    streamed = []
    history = launch_distributed(
        model_dir,
        examples,
        _config(grad_accum=2, learning_rate=1e-3, num_processes=2, save_every=1),
        tmp_path / "model",
        checkpoint_dir=tmp_path / "ckpt",
        on_step=lambda s, m: streamed.append((s, m["loss"])),
    )
    assert [s for s, _ in streamed] == [h["step"] for h in history] == [1, 2, 3, 4]
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["world"] == 2 and (tmp_path / "ckpt" / "rng-1.pt").is_file()
    assert [loss for _, loss in streamed] == pytest.approx([h["loss"] for h in single_history], abs=1e-5)
    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for (name, a), b in zip(single.model.state_dict().items(), ddp.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.slow  # torchrun workers
def test_two_process_fsdp_matches_one_process_and_resumes_exactly_from_its_sharded_checkpoint(
    model_dir, examples, tmp_path
):
    """FSDP2 over 2 gloo processes (each holds half of every sharded weight, gradient and AdamW state) against one
    process on the same 4 micro-batches per step: the same loss and gradient norm at every step and the same final
    weights (up to float reduction order, 1e-5); CPU offload with activation checkpointing gives the same losses.
    A 40-step run, terminated mid-run once the parent sees step 3,
    leaves its newest complete sharded (DCP) checkpoint; resuming from it gives bit-for-bit the uninterrupted run."""
    single, single_history = _train(model_dir, examples, _config(grad_accum=4, learning_rate=1e-3))
    config = _config(grad_accum=2, learning_rate=1e-3, num_processes=2, strategy="fsdp", save_every=2)
    history = launch_distributed(model_dir, examples, config, tmp_path / "model")
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single_history], abs=1e-5)
    assert [h["grad_norm"] for h in history] == pytest.approx([h["grad_norm"] for h in single_history], rel=1e-4)
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for (name, a), b in zip(single.model.state_dict().items(), sharded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    memory_saving = config.model_copy(update={"fsdp_cpu_offload": True, "gradient_checkpointing": True})
    offloaded = launch_distributed(model_dir, examples, memory_saving, tmp_path / "offloaded")
    assert [h["loss"] for h in offloaded] == pytest.approx([h["loss"] for h in history], abs=1e-6)

    # 40 steps outlast the parent's 0.5 s metrics poll by seconds, so the workers are stopped mid-run
    config = config.model_copy(update={"epochs": 20})
    full = launch_distributed(model_dir, examples, config, tmp_path / "full")
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        launch_distributed(
            model_dir, examples, config, tmp_path / "never", checkpoint_dir=checkpoint, on_step=stop_at(3)
        )
    saved = torch.load(checkpoint / "state.pt", weights_only=True)["step"]
    assert not (tmp_path / "never").exists() and 2 <= saved < len(full) and (checkpoint / "sharded").is_dir()
    resumed_steps = []
    resumed = launch_distributed(
        model_dir,
        examples,
        config,
        tmp_path / "resumed",
        checkpoint_dir=checkpoint,
        on_step=lambda s, m: resumed_steps.append(s),
    )
    assert resumed_steps == list(range(saved + 1, len(full) + 1))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    uninterrupted = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, again[name]), name


@pytest.mark.slow  # two torchrun agents
def test_two_nodes_of_one_process_train_as_two_processes_on_one_node(model_dir, examples, tmp_path, monkeypatch):
    """policy.nnodes = 2 on one machine: node 0 launches through a folder on the (here local) shared workspace, node
    1 joins from another process through the c10d rendezvous; the result is the one-process run's (as for DDP)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CREDITFLOW_RDZV_ENDPOINT", f"127.0.0.1:{port}")
    launch = tmp_path / "policy.launch"
    join = "import sys; from creditflow.tasks.train.launch import join_torchrun; "
    join += f"sys.exit(join_torchrun({str(launch)!r}, 1))"
    node1 = subprocess.Popen([sys.executable, "-c", join], env=os.environ)
    try:
        config = _config(grad_accum=2, learning_rate=1e-3, num_processes=1, nnodes=2)
        history = launch_distributed(model_dir, examples, config, tmp_path / "model", launch_dir=launch)
        assert node1.wait(timeout=120) == 0
    finally:
        node1.kill()
    single, single_history = _train(model_dir, examples, _config(grad_accum=4, learning_rate=1e-3))
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in single_history], abs=1e-5)
    two_nodes = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    for name, tensor in single.model.state_dict().items():
        assert torch.allclose(tensor, two_nodes[name], atol=1e-5), name
    assert not launch.exists()  # node 0 cleans up its launch folder


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def _run_stage(
    model_dir, data, workspace_dir, publish, config: PolicyConfig, scored_at: str = "torch.float32"
) -> tuple[StageContext, dict]:
    """compute_policy on published curate and token-reward artifacts (reference log-probs recorded as scored at
    ``scored_at``): (its context, its metrics)."""
    pairs, table = data
    workspace = Workspace.resolve(workspace_dir)
    split = [_pair(i, "eval") for i in range(100, 103)]  # eval pairs are not trained on
    store = workspace.store
    curate = publish(store, "curate", "c", {"pairs": pa.concat_tables([pairs, S.rows_to_table(split, S.PAIRS_SCHEMA)])})
    writer = store.writer("token_rewards", "t")
    writer.write_table("token_rewards", table)
    writer.write_json(REFERENCE_PRECISION_FILE, {"reference_logps": scored_at})
    knobs = {"reference_model": str(model_dir), "sources": ["contrastive"], "abc_beta": 0.8, **KNOBS}
    token_rewards = store.publish(
        writer, stage="token_rewards", fingerprint="t", inputs={}, config=knobs, code_version="t"
    )
    ctx = StageContext(
        config=config,
        workspace=workspace,
        upstream={"curate": curate, "token_rewards": token_rewards},
        writer=store.writer("policy", "p1"),
        run=Run.start(workspace, "policy-test", "policy"),
        progress=False,
        stage="policy",
        fingerprint="p1",
    )
    return ctx, compute_policy(ctx)


def test_stage_writes_model_train_log_and_mlflow_artifacts(model_dir, data, tmp_path, publish):
    ctx, metrics = _run_stage(model_dir, data, tmp_path / "ws", publish, _config(max_steps=3, save_every=1))
    run, store = ctx.run, ctx.workspace.store
    assert metrics["train_pairs"] == 24 and metrics["steps"] == 3
    assert 0 <= metrics["final_rewards_accuracy"] <= 1 and metrics["tokens_per_s"] > 0
    log = pq.read_table(ctx.writer.dir / "train_log.parquet")
    assert log.column("step").to_pylist() == [1, 2, 3]
    assert {"loss", "sequence_loss", "regularizer", "mean_w", "rewards_accuracy", "token_reward_corr"} <= set(
        log.column_names
    )
    trained = AutoModelForCausalLM.from_pretrained(ctx.writer.dir / "model")
    assert not torch.equal(trained.model.norm.weight, AutoModelForCausalLM.from_pretrained(model_dir).model.norm.weight)
    assert not ctx.checkpoint_dir.exists()  # removed once the model is in the artifact
    logged = {a.path for a in run.client.list_artifacts(run.run_id, "policy")}
    assert {"policy/loss_curve.png", "policy/model.json"} <= logged
    location = run.client.get_run(run.run_id).data.tags["creditflow.model_path"]
    assert location == str(store.path("policy", "p1") / "model")  # one copy of the weights: the artifact store's
    assert [m.step for m in run.client.get_metric_history(run.run_id, "loss")] == [1, 2, 3]


def test_stage_warns_naming_a_reference_scored_at_another_precision(model_dir, data, tmp_path, publish, caplog):
    with caplog.at_level(logging.WARNING, logger="creditflow.tasks.recipes.policy"):
        ctx, _ = _run_stage(model_dir, data, tmp_path / "ws", publish, _config(max_steps=1), "torch.bfloat16")
    assert "token_rewards artifact t scored the reference log-probs at torch.bfloat16" in caplog.text
    assert "this policy computes at torch.float32" in caplog.text
    tags = ctx.run.client.get_run(ctx.run.run_id).data.tags
    assert tags["creditflow.reference_precision"] == "torch.bfloat16 (policy: torch.float32)"


def test_an_adapter_only_lora_run_rebuilds_its_merged_model(model_dir, data, tmp_path, publish, monkeypatch):
    """lora.save_merged: false writes adapter/ alone (tokenizer and card in it); trained_model_folder merges it onto
    the base once, into the model cache: the network the same run with save_merged: true writes to model/."""
    import shutil

    import yaml

    monkeypatch.setenv("CREDITFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    runs = {
        merged: _run_stage(
            model_dir,
            data,
            tmp_path / str(merged),
            publish,
            _config(lora=LoraConfig(**lora, save_merged=merged), max_steps=3, learning_rate=1e-2),
        )[0].writer.dir
        for merged in (True, False)
    }
    adapter_only = runs[False]
    assert not (adapter_only / "model").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in (adapter_only / "adapter").iterdir()
    }
    assert trained_model_folder(runs[True]) == runs[True] / "model"
    rebuilt = trained_model_folder(adapter_only)
    assert rebuilt.parent == tmp_path / "cache" and trained_model_folder(adapter_only) == rebuilt  # merged once
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(runs[True] / "model").eval()(ids).logits
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(rebuilt).eval()(ids).logits, expected, atol=1e-5, rtol=0
        )
    # The merged model's card: the metadata and title of the save_merged: true run's model/ card.
    cards = [(folder / "README.md").read_text().split("---\n") for folder in (rebuilt, runs[True] / "model")]
    assert yaml.safe_load(cards[0][1]) == yaml.safe_load(cards[1][1])
    assert cards[0][2].splitlines()[:3] == cards[1][2].splitlines()[:3] and "policy" in cards[0][2].splitlines()[1]
    # An adapter whose base folder is gone names it.
    orphan = tmp_path / "orphan"
    shutil.copytree(adapter_only / "adapter", orphan / "adapter")
    config = json.loads((orphan / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (orphan / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"its base model '{tmp_path / 'gone'}' \(base_model_name_or_path in"):
        trained_model_folder(orphan)


@pytest.mark.parametrize("section", ["policy", "rl"])
def test_an_adapter_only_run_needs_the_adapter(section):
    with pytest.raises(ConfigError, match=rf"{section}\.lora: save_merged: false needs save_adapter: true"):
        load_config(None, {f"{section}.lora": {"save_merged": False, "save_adapter": False}})


def test_a_trained_policy_artifact_holds_model_or_adapter(tmp_path):
    for table in ("train_log", "train_timings"):
        (tmp_path / f"{table}.parquet").touch()
    assert missing_outputs(STAGES["policy"], tmp_path) == [("model/", "adapter/")]  # neither: refused
    (tmp_path / "adapter").mkdir()
    assert missing_outputs(STAGES["policy"], tmp_path) == []
    assert missing_outputs(STAGES["rl"], tmp_path) == ["samples"]  # its model/-or-adapter/ group is met too


def test_reference_logprobs_at_the_policys_precision_start_dpo_at_a_zero_margin(model_dir, examples):
    """bf16 emulated on CPU: reference log-probs taken under the policy's precision (fp32 weights, bf16 autocast;
    `token_rewards.dtype: auto`) equal the policy's first forward, so z = 0 at step 0. From bf16 weights (what the
    reference pass used on CUDA before) they do not."""
    import copy

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs = examples[:4]
    batch = collate(pairs, 0, CPU)
    sides = [e.chosen for e in pairs] + [e.rejected for e in pairs]
    prompts, completions = [len(s.prompt_ids) for s in sides], [len(s.completion_ids) for s in sides]

    def margins(flat):
        per_row = torch.stack([t.sum() for t in flat.split(completions)])
        return 0.1 * (per_row[: len(pairs)] - per_row[len(pairs) :])

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        policy = training_logprobs(model, batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
        reference = torch.cat(completion_logprobs(model, batch.input_ids, batch.attention_mask, prompts, completions))
    assert torch.equal(policy, reference)
    assert margins(policy - reference).abs().max() == 0  # z = 0 at step 0
    bf16_weights = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        approximate = torch.cat(
            completion_logprobs(bf16_weights, batch.input_ids, batch.attention_mask, prompts, completions)
        )
    assert margins(policy - approximate).abs().max() > 1e-4
