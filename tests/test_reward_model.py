"""Reward model: the Bradley-Terry loss, training on a tiny model, resume, scoring, on-policy pairs."""

import math

import pyarrow as pa
import pytest
import torch
from conftest import Interrupt, stop_at, train_reward_model
from transformers import AutoModelForSequenceClassification

from creditflow.tasks.config_base import SamplingConfig
from creditflow.tasks.configs import RewardModelConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.infer.generation import sample_responses
from creditflow.tasks.infer.reward_scoring import RewardScorer, encode_for_reward
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.recipes.onpolicy import build_pairs
from creditflow.tasks.recipes.reward_model import PairData, bradley_terry_loss, launch_distributed

GOOD = ["great", "wonderful", "lovely", "happy", "excellent"]
BAD = ["awful", "terrible", "sad", "horrible", "boring"]


def _separable(n: int, offset: int = 0) -> PairData:
    prompts, chosen, rejected = [], [], []
    for i in range(offset, offset + n):
        prompts.append([{"role": "user", "content": f"How was day {i}?"}])
        chosen.append([{"role": "assistant", "content": f"It was {GOOD[i % 5]} and {GOOD[(i + 2) % 5]}."}])
        rejected.append([{"role": "assistant", "content": f"It was {BAD[i % 5]} and {BAD[(i + 3) % 5]}."}])
    return PairData(prompts, chosen, rejected, [1.0] * n)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    corpus = [f"It was {g} and {b}. How was day {i}?" for i, (g, b) in enumerate(zip(GOOD * 4, BAD * 4))]
    return build_tiny_reward_backbone(tmp_path_factory.mktemp("rm_base"), corpus, seed=0)


def test_bradley_terry_loss_matches_hand_computed_values():
    r_c, r_r = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    # -log sigmoid(1) = 0.3132617, -log sigmoid(-0.5) = 0.9740770
    assert bradley_terry_loss(r_c, r_r).item() == pytest.approx((0.3132617 + 0.9740770) / 2, abs=1e-6)
    # margin m = [0.5, 0]: logits [0.5, -0.5] -> 0.4740770 and 0.9740770
    margin = torch.tensor([0.5, 0.0])
    assert bradley_terry_loss(r_c, r_r, margin).item() == pytest.approx((0.4740770 + 0.9740770) / 2, abs=1e-6)
    # centering adds c * mean((r_c + r_r)^2) = 0.01 * (1 + 2.25) / 2
    centered = bradley_terry_loss(r_c, r_r, center_coefficient=0.01).item()
    assert centered == pytest.approx((0.3132617 + 0.9740770) / 2 + 0.01625, abs=1e-6)


def test_bradley_terry_gradient_is_minus_sigmoid_of_minus_logit():
    r_c = torch.tensor([1.0, 0.5], requires_grad=True)
    r_r = torch.tensor([0.0, 1.0], requires_grad=True)
    bradley_terry_loss(r_c, r_r).backward()
    expected = torch.tensor([-1 / (1 + math.e), -1 / (1 + math.exp(-0.5))]) / 2  # -sigmoid(-(r_c - r_r)) / B
    assert torch.allclose(r_c.grad, expected, atol=1e-6)
    assert torch.allclose(r_r.grad, -expected, atol=1e-6)


def test_training_changes_every_parameter_and_separates_the_eval_set(backbone):
    config = RewardModelConfig(learning_rate=3e-3, epochs=3, batch_size=8, warmup_ratio=0.0, save_every=1000)
    before = {
        n: p.detach().clone()
        for n, p in AutoModelForSequenceClassification.from_pretrained(backbone).named_parameters()
    }
    steps = []
    _, model, history = train_reward_model(
        backbone,
        _separable(64),
        _separable(32, offset=1000),
        config,
        on_step=lambda s, m: steps.append((s, m)),
        progress=False,
    )
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert unchanged == []
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["eval.accuracy"] > 0.9
    assert history[-1]["eval.margin"] > 0
    train_losses = [m["train.loss"] for _, m in steps if "train.loss" in m]
    assert len(train_losses) == 24 and sum(train_losses[-4:]) < sum(train_losses[:4])


def test_packed_training_takes_the_padded_steps(backbone):
    """packing: chosen and rejected rows in packed rows, the score head on each sequence's last token: the same
    rewards, losses and weights as the padded sequence classifier, within rounding."""
    runs = {}
    for packing in (False, True):
        config = RewardModelConfig(
            learning_rate=3e-3, max_steps=3, batch_size=8, warmup_ratio=0.0, save_every=1000, packing=packing
        )
        steps: list[dict] = []
        _, model, history = train_reward_model(
            backbone,
            _separable(24),
            _separable(8, 1000),
            config,
            on_step=lambda _, m, steps=steps: steps.append(m),
            progress=False,
        )
        runs[packing] = ([m["train.loss"] for m in steps if "train.loss" in m], model.state_dict(), history)
    (padded_losses, padded_weights, padded_eval), (packed_losses, packed_weights, packed_eval) = runs.values()
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4, abs=1e-6)
    # Adam divides each gradient by its own running scale, so rounding in a near-zero gradient can move a weight by
    # up to the learning rate a step: allow 1% of the largest movement (measured: 1.3e-5, 0.15% of it, on one CPU).
    movement = config.learning_rate * config.max_steps
    for name, value in padded_weights.items():
        assert torch.allclose(packed_weights[name], value, atol=0.01 * movement), name
    assert packed_eval[-1]["eval.accuracy"] == padded_eval[-1]["eval.accuracy"]


def test_packing_refuses_an_encoder_reward_model(encoder_backbone):
    config = RewardModelConfig(max_steps=1, batch_size=4, packing=True)
    with pytest.raises(ValueError, match="packing needs a decoder reward model"):
        train_reward_model(encoder_backbone, _separable(8), _separable(4, 1000), config, progress=False)


def test_interrupted_training_resumes_to_the_same_weights(backbone, tmp_path):
    config = RewardModelConfig(
        learning_rate=1e-3, epochs=2, batch_size=4, grad_accum=2, save_every=2, warmup_ratio=0.25
    )
    train, evaluation = _separable(24), _separable(8, offset=500)
    _, straight, _ = train_reward_model(backbone, train, evaluation, config, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_five(step, metrics):
        if step == 5 and "train.loss" in metrics:
            raise Interrupt

    checkpoints = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        train_reward_model(
            backbone, train, evaluation, config, checkpoint_dir=checkpoints, on_step=stop_at_five, progress=False
        )
    assert torch.load(checkpoints / "state.pt", weights_only=True)["step"] == 4
    resumed_steps = []
    _, resumed, _ = train_reward_model(
        backbone,
        train,
        evaluation,
        config,
        checkpoint_dir=checkpoints,
        on_step=lambda s, m: resumed_steps.append(s),
        progress=False,
    )
    assert resumed_steps[0] == 5  # continued, not restarted
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.slow  # torchrun workers
def test_two_process_fsdp_matches_one_process_and_resumes_exactly_from_its_sharded_checkpoint(backbone, tmp_path):
    """FSDP2 over 2 gloo processes (each holds half of every block's weights, gradients and AdamW state) against
    one process on the same 4 micro-batches per step: the same loss and gradient norm at every step, the same eval
    accuracy per epoch and the same final weights (up to float reduction order, 1e-5). A 40-step run, terminated
    mid-run once the parent sees step 3, leaves its newest complete sharded (DCP) checkpoint; resuming from it gives
    bit-for-bit the uninterrupted run."""
    train, evaluation = _separable(32), _separable(8, offset=500)
    knobs = {"learning_rate": 1e-3, "epochs": 2, "batch_size": 4, "warmup_ratio": 0.25, "save_every": 2}

    def losses(into: list, norms: list | None = None):
        def record(step, metrics):
            if "train.loss" in metrics:
                into.append(metrics["train.loss"])
                if norms is not None:
                    norms.append(metrics["train.grad_norm"])

        return record

    single_losses: list[float] = []
    single_norms: list[float] = []
    single_config = RewardModelConfig(**knobs, grad_accum=4)
    _, single, single_history = train_reward_model(
        backbone, train, evaluation, single_config, on_step=losses(single_losses, single_norms), progress=False
    )
    config = RewardModelConfig(**knobs, grad_accum=2, num_processes=2, strategy="fsdp")
    streamed: list[float] = []
    norms: list[float] = []
    history = launch_distributed(
        backbone, train, evaluation, config, tmp_path / "model", on_step=losses(streamed, norms)
    )
    assert len(streamed) == 4 and streamed == pytest.approx(single_losses, abs=1e-5)
    assert norms == pytest.approx(single_norms, rel=1e-4) and min(norms) > 0
    assert [h["eval.accuracy"] for h in history] == [h["eval.accuracy"] for h in single_history]
    sharded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    for (name, a), b in zip(single.state_dict().items(), sharded.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name

    # 40 steps outlast the parent's 0.5 s metrics poll by seconds, so the workers are stopped mid-run
    config = config.model_copy(update={"epochs": 20})
    full: list[float] = []
    launch_distributed(backbone, train, evaluation, config, tmp_path / "full", on_step=losses(full))
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(Interrupt):
        launch_distributed(
            backbone, train, evaluation, config, tmp_path / "never", checkpoint_dir=checkpoint, on_step=stop_at(3)
        )
    saved = torch.load(checkpoint / "state.pt", weights_only=True)["step"]
    assert not (tmp_path / "never").exists() and 2 <= saved < len(full) and (checkpoint / "sharded").is_dir()
    resumed: list[float] = []
    launch_distributed(
        backbone, train, evaluation, config, tmp_path / "resumed", checkpoint_dir=checkpoint, on_step=losses(resumed)
    )
    assert resumed == full[saved:]  # the steps after the checkpoint only, bit for bit
    uninterrupted = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").state_dict()
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "resumed").state_dict()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, again[name]), name


def test_scorer_is_independent_of_batching_and_padding(backbone):
    data = _separable(10)
    scorer = RewardScorer(backbone, batch_size=4)
    batched = scorer.score(data.prompts, data.chosen)
    one_by_one = [RewardScorer(backbone, batch_size=1).score([p], [c])[0] for p, c in zip(data.prompts, data.chosen)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(round(x, 6) for x in batched)) > 1


def test_onpolicy_pairs_are_valid_and_keep_the_prompt_split(backbone, tmp_path):
    policy = build_tiny_causal_lm(tmp_path / "policy", ["It was great and lovely. How was day 3?"] * 10, seed=1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    data = _separable(6)
    rows = []
    for i, prompt in enumerate(data.prompts):
        rows.append(
            {
                **{k: None for k in S.PAIRS_SCHEMA.names},
                "prompt": prompt,
                "prompt_id": S.prompt_id(prompt),
                "chosen": data.chosen[i],
                "rejected": data.rejected[i],
                "split": "eval" if i == 0 else "train",
                "pair_id": f"p{i}",
                "source": "t",
                "source_row": str(i),
            }
        )
    rows.append(dict(rows[1], pair_id="dup"))  # a second pair for the same prompt: one generation per prompt
    prompts = S.unique_prompts(pa.Table.from_pylist(rows, schema=S.PAIRS_SCHEMA), limit=None)
    assert prompts.num_rows == 6

    sampling = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=12, batch_size=4, seed=7)
    samples = sample_responses(model, tokenizer, prompts.column("prompt").to_pylist(), 3, sampling, progress=False)
    assert samples == sample_responses(model, tokenizer, prompts.column("prompt").to_pylist(), 3, sampling, False)
    assert [len(s) for s in samples] == [3] * 6
    scorer = RewardScorer(backbone)
    scores = [
        scorer.score([p] * 3, [[{"role": "assistant", "content": t}] for t in texts])
        for p, texts in zip(prompts.column("prompt").to_pylist(), samples)
    ]
    pairs, quarantine = build_pairs(prompts, samples, scores, "tiny", min_margin=0.0)
    assert len(pairs) + len(quarantine) == 6
    assert pairs, "a random tiny policy still yields distinct samples"
    for pair in pairs:
        assert (
            pair["score_chosen"] >= pair["score_rejected"]
            and pair["margin"] == pair["score_chosen"] - pair["score_rejected"]
        )
        assert pair["chosen"][0]["content"] and pair["chosen"] != pair["rejected"]
        assert pair["split"] == ("eval" if pair["prompt_id"] == S.prompt_id(data.prompts[0]) else "train")
    table = S.rows_to_table(pairs, S.PAIRS_SCHEMA)
    assert table.schema == S.PAIRS_SCHEMA


def test_onpolicy_quarantines_prompts_that_cannot_form_a_pair():
    prompts = pa.table(
        {
            "prompt_id": ["a", "b", "c"],
            "prompt": [[{"role": "user", "content": x}] for x in "abc"],
            "split": ["train"] * 3,
        }
    )
    samples = [["", "", "x"], ["same", "same", "same"], ["one", "two", "three"]]
    scores = [[0.0, 0.0, 1.0], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]]
    pairs, quarantine = build_pairs(prompts, samples, scores, "tiny", min_margin=0.0)
    assert pairs == []
    assert [(q["source_row"], q["rule"]) for q in quarantine] == [
        ("prompt a", "empty"),
        ("prompt b", "identical"),
        ("prompt c", "margin"),
    ]


@pytest.fixture(scope="module")
def encoder_backbone(tmp_path_factory):
    """A tiny BERT (the MiniLM family): no chat template, reward read at CLS, prompt and response as a text pair."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    words = sorted({w.strip("?.").lower() for text in [*GOOD, *BAD, "how was day it and"] for w in text.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"0123456789?."]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert "[UNK]" not in tokenizer.tokenize("It was great and lovely.")
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return folder


def test_encoder_backbone_uses_text_pairs_and_trains(encoder_backbone):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_backbone)
    data = _separable(2)
    encoded = encode_for_reward(tokenizer, data.prompts, data.chosen, max_length=64)
    first = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    assert first[0] == "[CLS]" and first.count("[SEP]") == 2 and set(encoded["token_type_ids"][0]) == {0, 1}
    truncated = encode_for_reward(tokenizer, data.prompts, data.chosen, max_length=8)
    assert all(len(ids) == 8 for ids in truncated["input_ids"])

    config = RewardModelConfig(learning_rate=2e-3, epochs=3, batch_size=8, warmup_ratio=0.0)
    _, model, history = train_reward_model(
        encoder_backbone, _separable(48), _separable(16, offset=300), config, progress=False
    )
    assert history[-1]["eval.accuracy"] > 0.9
    scorer = RewardScorer(encoder_backbone, batch_size=3)
    batched = scorer.score(data.prompts * 3, (data.chosen + data.rejected) * 1 + data.chosen)
    single = [
        RewardScorer(encoder_backbone, batch_size=1).score([p], [c])[0]
        for p, c in zip(data.prompts * 3, (data.chosen + data.rejected) + data.chosen)
    ]
    assert batched == pytest.approx(single, abs=1e-5)


class _Planted:
    """A pickle that would run code when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_a_checkpoint_is_refused_not_run(backbone, tmp_path):
    import pickle

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    marker = tmp_path / "pwned"
    (checkpoint / "state.pt").write_bytes(pickle.dumps({"step": 1, "payload": _Planted(marker)}, protocol=2))
    config = RewardModelConfig(max_steps=1, batch_size=4)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train_reward_model(
            backbone, _separable(8), _separable(4, 100), config, checkpoint_dir=checkpoint, progress=False
        )
    assert not marker.exists()


@pytest.mark.parametrize("disable", [True, False])
def test_the_reward_model_trains_without_dropout_unless_asked(encoder_backbone, disable):
    from creditflow.tasks.recipes.reward_model import RewardModelTrainer

    data = _separable(4)
    config = RewardModelConfig(disable_dropout=disable)
    trainer = RewardModelTrainer(encoder_backbone, data, data, config, progress=False)
    assert trainer.model.training
    batch = {k: torch.tensor(v) for k, v in encode_for_reward(trainer.tokenizer, data.prompts, data.chosen, 64).items()}
    with torch.no_grad():
        first, second = trainer.model(**batch).logits, trainer.model(**batch).logits
    assert torch.equal(first, second) == disable  # BERT's hidden and attention dropout (0.1) in train mode
