"""Chunked / fused per-token log-probs against the full-vocabulary log_softmax reference."""

import math

import pytest
import torch
from conftest import CORPUS
from transformers import AutoModelForCausalLM

from creditflow.tasks.models.logprobs import (
    check_lm_head,
    completion_logprobs,
    label_logprobs,
    naive_completion_logprobs,
)
from creditflow.tasks.models.tiny import build_tiny_causal_lm


def test_label_logprobs_hand_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 1])
    expected = [
        2.0 - math.log(math.e**2 + 2),
        -math.log(3.0),
        2.0 - math.log(math.e + math.e**2 + math.e**3),
    ]
    assert label_logprobs(logits, labels, chunk_size=2).tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_label_logprobs_matches_log_softmax_any_chunk_and_dtype(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(50, 300) * 5
    labels = torch.randint(0, 300, (50,))
    naive = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    assert torch.allclose(label_logprobs(logits, labels, chunk_size), naive, atol=1e-5)
    # bf16 logits are upcast per chunk: the result is the fp32 log-softmax of the bf16 values
    half = logits.bfloat16()
    naive_half = torch.log_softmax(half.float(), -1).gather(-1, labels[:, None])[:, 0]
    out = label_logprobs(half, labels, chunk_size)
    assert out.dtype == torch.float32 and torch.allclose(out, naive_half, atol=1e-5)


def _padded_batch(lengths, vocab, seed=0):
    torch.manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_completion_logprobs_match_naive_with_padding(tiny_lm, chunk_size):
    prompts, completions = [5, 1, 12, 3], [9, 4, 1, 20]
    ids, mask = _padded_batch([p + c for p, c in zip(prompts, completions)], tiny_lm.config.vocab_size)
    fused = completion_logprobs(tiny_lm, ids, mask, prompts, completions, chunk_size)
    naive = naive_completion_logprobs(tiny_lm, ids, mask, prompts, completions)
    assert [len(x) for x in fused] == completions
    for a, b in zip(fused, naive):
        assert torch.allclose(a, b, atol=1e-5)


def test_completion_logprobs_do_not_depend_on_batch_neighbours(tiny_lm):
    prompts, completions = [4, 9], [6, 11]
    ids, mask = _padded_batch([10, 20], tiny_lm.config.vocab_size, seed=3)
    together = completion_logprobs(tiny_lm, ids, mask, prompts, completions)
    alone = completion_logprobs(tiny_lm, ids[:1, :10], mask[:1, :10], prompts[:1], completions[:1])
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_softcapped_head_matches_the_model_logits(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,  # small cap: the tanh visibly changes the log-probs
    )
    model = Gemma2ForCausalLM(config).eval()
    check_lm_head(model)
    ids, mask = _padded_batch([12, 8], 128)
    fused = completion_logprobs(model, ids, mask, [2, 3], [10, 5])
    naive = naive_completion_logprobs(model, ids, mask, [2, 3], [10, 5])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused, naive))


def test_check_lm_head_rejects_unreproduced_logit_processing(tmp_path):
    folder = build_tiny_causal_lm(tmp_path, CORPUS)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    model.config.final_logit_softcapping = 0.5  # Llama ignores it; the fused head would apply it
    with pytest.raises(NotImplementedError, match="not the LM head"):
        check_lm_head(model)
