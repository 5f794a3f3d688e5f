"""ABC: redistribution formula, the attention row read from the reward model, and projection onto policy tokens."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from creditflow.tasks.credit.attention_credit import (
    abc_token_rewards,
    encode_for_abc,
    project_rewards,
    project_to_policy,
    score_abc,
)
from creditflow.tasks.data.schema import completion_text
from creditflow.tasks.models.loading import load_abc_model
from creditflow.tasks.models.tiny import build_tiny_reward_backbone, build_tiny_tokenizer
from creditflow.tasks.models.tokenization import completion_offsets, encode_pair

CORPUS = ["the quick brown fox jumps over the lazy dog", "a helpful answer is correct and concise"] * 20
PROMPT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "How was the trip?"}]
RESPONSES = [
    [{"role": "assistant", "content": "  It was lovely, thank you 🎉  "}],
    [{"role": "assistant", "content": "Awful."}],
    [{"role": "assistant", "content": "First part."}, {"role": "assistant", "content": "Second part, longer."}],
]
CPU = torch.device("cpu")


def _build_tiny_bert_rm(folder):
    """A 2-layer BERT sequence classifier with a WordPiece tokenizer: the encoder (CLS read-out) case."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=fast.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["decoder", "encoder"])
def reward_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "decoder":
        build_tiny_reward_backbone(folder, CORPUS)
    else:
        _build_tiny_bert_rm(folder)
    return load_abc_model(folder, CPU, torch.float32)


def test_formula_hand_values():
    attention = torch.tensor([1.0, 3.0])  # normalized: a = [0.25, 0.75]
    rewards = abc_token_rewards(attention, reward=2.0, beta=0.5)
    # r_t = beta a_t r + (1 - beta) r [t = last] = [0.5*0.25*2, 0.5*0.75*2 + 0.5*2]
    assert rewards.tolist() == pytest.approx([0.25, 1.75])
    assert abc_token_rewards(attention, reward=-3.0, beta=0.0).tolist() == pytest.approx([0.0, -3.0])
    assert abc_token_rewards(attention, reward=2.0, beta=1.0).tolist() == pytest.approx([0.5, 1.5])


def test_input_matches_the_reward_model_stage(reward_model):
    from creditflow.tasks.infer.reward_scoring import encode_for_reward

    tokenizer, _ = reward_model
    for completion in RESPONSES:
        item = encode_for_abc(tokenizer, PROMPT, completion, 128)
        assert item.input_ids == encode_for_reward(tokenizer, [PROMPT], [completion], 128)["input_ids"][0]


def test_response_spans_cover_the_response_text(reward_model):
    tokenizer, _ = reward_model
    for completion in RESPONSES:
        item = encode_for_abc(tokenizer, PROMPT, completion, 128)
        text = completion_text(completion)
        assert item.response_positions == sorted(item.response_positions)
        covered = {c for s, e in zip(item.char_start, item.char_end) for c in range(s, e)}
        assert covered <= set(range(len(text)))
        # only whitespace is left out (trimmed by the chat template, or a separator for WordPiece)
        assert all(text[i].isspace() for i in set(range(len(text))) - covered)


def test_rewards_sum_to_r_and_follow_the_read_out_attention(reward_model):
    tokenizer, model = reward_model
    items = [encode_for_abc(tokenizer, PROMPT, c, 128) for c in RESPONSES]
    results = score_abc(model, items, beta=1.0, batch_size=2, pad_id=tokenizer.pad_token_id)
    for item, result in zip(items, results):
        # Reference: the model alone, all layers' attentions, the read-out row of the last layer.
        inputs = {"input_ids": torch.tensor([item.input_ids])}
        if item.token_type_ids is not None:
            inputs["token_type_ids"] = torch.tensor([item.token_type_ids])
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
        read = 0 if model.config.model_type == "bert" else len(item.input_ids) - 1
        row = out.attentions[-1][0, :, read, item.response_positions].mean(0)
        assert result.reward == pytest.approx(out.logits[0, 0].item(), abs=1e-5)
        assert float(np.sum(result.rewards, dtype=np.float64)) == pytest.approx(result.reward, abs=1e-6)
        assert np.allclose(result.rewards, (row / row.sum() * result.reward).numpy(), atol=1e-6)


def test_beta_zero_is_the_sparse_reward(reward_model):
    tokenizer, model = reward_model
    items = [encode_for_abc(tokenizer, PROMPT, c, 128) for c in RESPONSES]
    for item, result in zip(items, score_abc(model, items, beta=0.0, batch_size=3, pad_id=tokenizer.pad_token_id)):
        assert len(result.rewards) == len(item.response_positions)
        assert np.all(result.rewards[:-1] == 0.0) and result.rewards[-1] == np.float32(result.reward)


def test_truncation_keeps_the_response_end_and_fails_when_nothing_is_left(reward_model):
    tokenizer, _ = reward_model
    long_prompt = [{"role": "user", "content": "the lazy dog " * 100}]
    item = encode_for_abc(tokenizer, long_prompt, RESPONSES[1], 24)
    assert len(item.input_ids) == 24 and item.response_positions
    # 2 tokens hold only the chat template's "<|im_end|>\n"; 4 only [CLS] [SEP] [SEP] and one prompt token
    too_short = 2 if tokenizer.chat_template else 4
    with pytest.raises(ValueError, match="no response token"):
        encode_for_abc(tokenizer, long_prompt, RESPONSES[1], too_short)


def test_projection_hand_values():
    # one source token over two target tokens, split by overlapping characters; EOS (zero width) gets nothing
    out = project_rewards([1.0, 0.3], [0, 4], [4, 6], [0, 1, 4, 6], [1, 4, 6, 6])
    assert out.tolist() == pytest.approx([0.25, 0.75, 0.3, 0.0])
    # text beyond the target's truncation goes to the last target token
    out = project_rewards([1.0, 2.0, 4.0], [0, 2, 5], [2, 5, 9], [0, 1], [1, 2])
    assert out.tolist() == pytest.approx([0.5, 6.5])


@settings(max_examples=40, deadline=None)
@given(st.text(min_size=1, max_size=60), st.integers(min_value=1, max_value=30))
def test_projection_between_tokenizers_preserves_the_sum(tokenizers_pair, text, keep):
    source, target = tokenizers_pair
    completion = [{"role": "assistant", "content": text}]
    src = completion_offsets(source, [completion])[0][:-1]  # RM-like tokens: no EOS
    dst = completion_offsets(target, [completion])[0][:keep]  # policy tokens, possibly truncated
    rewards = np.random.default_rng(len(text)).normal(size=len(src))
    out = project_rewards(rewards, [s for s, _ in src], [e for _, e in src], [s for s, _ in dst], [e for _, e in dst])
    assert len(out) == len(dst)
    assert float(out.sum(dtype=np.float64)) == pytest.approx(float(rewards.sum()), abs=1e-5)


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """Two byte-level BPEs with different vocabularies: the RM and the policy tokenize the same text differently."""
    first = build_tiny_tokenizer(tmp_path_factory.mktemp("a"), CORPUS, vocab_size=300)
    second = build_tiny_tokenizer(tmp_path_factory.mktemp("b"), [t.upper() + " " + t for t in CORPUS], vocab_size=600)
    return first, second


def test_project_to_policy_aligns_with_encode_pair(reward_model, tokenizers_pair):
    tokenizer, model = reward_model
    policy = tokenizers_pair[1]
    completion = RESPONSES[0]
    item = encode_for_abc(tokenizer, PROMPT, completion, 128)
    result = score_abc(model, [item], beta=0.8, batch_size=1, pad_id=tokenizer.pad_token_id)[0]
    row = {"rewards": result.rewards, "char_start": item.char_start, "char_end": item.char_end}
    prompt_ids, full_ids = encode_pair(policy, PROMPT, completion)
    for max_length in (None, len(prompt_ids) + len(full_ids) // 2):
        _, completion_ids = encode_pair(policy, PROMPT, completion, max_length=max_length)
        projected = project_to_policy(row, policy, completion, len(completion_ids))
        assert len(projected) == len(completion_ids)
        assert float(projected.sum(dtype=np.float64)) == pytest.approx(result.reward, abs=1e-5)


def test_regularizer_form_recovers_the_shares_and_is_centered_and_bounded():
    from creditflow.tasks.credit.attention_credit import attention_shares, bounded_rewards

    official = abc_token_rewards(torch.tensor([1.0, 3.0]), reward=2.0, beta=0.5).numpy()  # [0.25, 1.75]
    reward, shares = attention_shares(official, beta=0.5)
    assert reward == pytest.approx(2.0) and shares.tolist() == pytest.approx([0.25, 0.75])  # the attention row
    assert attention_shares(official, beta=0.0)[1].tolist() == pytest.approx([0.5, 0.5])  # no attention: uniform
    assert attention_shares([0.0, 0.0], beta=0.8)[1].tolist() == pytest.approx([0.5, 0.5])  # r = 0: uniform
    assert bounded_rewards(0.0, shares).tolist() == [0.0, 0.0]  # an average response: nothing to push
    up, down = bounded_rewards(1.0, shares), bounded_rewards(-1.0, shares)
    assert np.allclose(up, -down) and (up > 0).all() and (np.abs(up) < 0.5).all()
    assert up.tolist() == pytest.approx([1 / (1 + math.exp(-0.5)) - 0.5, 1 / (1 + math.exp(-1.5)) - 0.5])
    assert up[1] > up[0]  # more attention, more of the sign
