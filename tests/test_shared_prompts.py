"""Shared-prompt passes (tasks/models/shared_prompts.py) against whole padded rows: states, gradients, the reward
model's read-out and generate()'s samples."""

import copy

import pytest
import torch
from conftest import CORPUS
from transformers import AutoModelForCausalLM

from creditflow.tasks.config_base import SamplingConfig
from creditflow.tasks.infer.generation import sample_token_ids
from creditflow.tasks.infer.reward_scoring import score_pairs
from creditflow.tasks.models.loading import load_reward_model, load_tokenizer
from creditflow.tasks.models.logprobs import completion_positions
from creditflow.tasks.models.shared_prompts import PromptGroups, completion_states, final_states, token_states
from creditflow.tasks.models.tiny import build_tiny_reward_backbone
from creditflow.tasks.models.tokenization import padded_batch

CPU = torch.device("cpu")


def _rollouts(vocab: int, seed: int = 0):
    """Three prompts of different lengths with 3, 1 and 2 completions (one of a single token), interleaved."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    prompts = [ids(7), ids(3), ids(11)]
    owners = [0, 1, 0, 2, 0, 2]
    completions = [ids(n) for n in (5, 1, 9, 4, 2, 6)]
    return [prompts[o] for o in owners], completions


def _padded_states(lm, prompts, completions):
    """Reference: every row ``[prompt | completion | pad]`` on its own, no sharing."""
    ids, mask = padded_batch([p + c for p, c in zip(prompts, completions)], 0)
    hidden = lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows, cols = completion_positions([len(p) for p in prompts], [len(c) for c in completions], CPU)
    return hidden[rows, cols - 1]


@pytest.fixture(scope="module")
def lm64(tiny_lm):
    return copy.deepcopy(tiny_lm).double().eval()  # float64: sharing must change nothing but rounding


def test_groups_run_each_distinct_prompt_once():
    prompts, completions = _rollouts(50)
    groups = PromptGroups.of(prompts, completions, 0, CPU)
    assert groups.prompt_ids.shape == (3, 11)  # right-padded to the longest prompt
    assert groups.group.tolist() == [0, 1, 0, 2, 0, 2]
    assert groups.prompt_ids[1, 3:].tolist() == [0] * 8 and groups.prompt_mask[1].tolist() == [1] * 3 + [0] * 8
    assert groups.labels.tolist() == [t for c in completions for t in c]
    assert groups.lengths == [5, 1, 9, 4, 2, 6]
    assert groups.tokens() == sum(len(p) + len(c) for p, c in zip(prompts, completions))


def test_shared_states_equal_whole_rows(lm64):
    prompts, completions = _rollouts(lm64.config.vocab_size)
    groups = PromptGroups.of(prompts, completions, 0, CPU)
    with torch.no_grad():
        shared = token_states(lm64.base_model, groups)
        torch.testing.assert_close(shared, _padded_states(lm64, prompts, completions), rtol=0, atol=1e-10)
        assert completion_states(lm64.base_model, groups).shape[:2] == groups.completion_ids.shape


def test_eager_attention_gives_the_same_states_without_nan(tiny_lm_dir):
    """Eager attention turns a query that sees no key into NaN: no row of a pass may be all padding."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float64, attn_implementation="eager").eval()
    prompts, completions = _rollouts(lm.config.vocab_size, seed=4)
    with torch.no_grad():
        shared = token_states(lm.base_model, PromptGroups.of(prompts, completions, 0, CPU))
        assert not shared.isnan().any()  # eager's softmax runs in fp32: fp32 rounding over keys of other widths
        torch.testing.assert_close(shared, _padded_states(lm, prompts, completions), rtol=0, atol=1e-6)


def test_gradients_through_the_shared_prompt_equal_whole_rows(lm64):
    prompts, completions = _rollouts(lm64.config.vocab_size, seed=1)
    weights = torch.randn(sum(len(c) for c in completions), lm64.config.hidden_size, dtype=torch.float64)

    def grads(states_of):
        lm64.zero_grad()
        (states_of() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in lm64.named_parameters() if p.grad is not None}

    groups = PromptGroups.of(prompts, completions, 0, CPU)
    shared = grads(lambda: token_states(lm64.base_model, groups))
    padded = grads(lambda: _padded_states(lm64, prompts, completions))
    assert shared.keys() == padded.keys() == {name for name, _ in lm64.named_parameters()}
    for name in shared:  # Llama's RMSNorm computes in fp32 even in a fp64 model: fp32 rounding, summed in two orders
        assert float((shared[name] - padded[name]).abs().max()) <= 1e-6 * float(padded[name].abs().max()), name
    lm64.zero_grad()


def test_activation_checkpointing_in_training_runs_whole_rows(tiny_lm_dir):
    """transformers drops the cache under checkpointing in train mode: the pass must not rely on it."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float64)
    prompts, completions = _rollouts(lm.config.vocab_size, seed=2)
    groups = PromptGroups.of(prompts, completions, 0, CPU)
    with torch.no_grad():
        expected = token_states(lm.eval().base_model, groups)
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    states = token_states(lm.train().base_model, groups)
    states.sum().backward()
    torch.testing.assert_close(states.detach(), expected, rtol=0, atol=1e-10)


def test_reward_model_scores_a_prompts_completions_as_it_scores_each_alone(tmp_path):
    folder = build_tiny_reward_backbone(tmp_path / "rm", CORPUS)
    tokenizer, model = load_reward_model(folder, CPU)
    model = model.double()
    prompts = [[{"role": "user", "content": text}] for text in ("the quick brown fox", "a helpful answer")]
    answers = ["jumps over the lazy dog", "is", "correct and concise", "the dog", "a concise answer is correct"]
    rows = [(prompts[i % 2], [{"role": "assistant", "content": a}]) for i, a in enumerate(answers)]
    together = score_pairs(model, tokenizer, [p for p, _ in rows], [c for _, c in rows], 512, 2)
    alone = [score_pairs(model, tokenizer, [p], [c], 512, 2)[0] for p, c in rows]  # the classifier's own forward
    assert together == pytest.approx(alone, abs=1e-9)
    assert len(set(round(s, 6) for s in together)) == len(answers)


def test_final_states_are_each_rows_last_token(lm64):
    prompts, completions = _rollouts(lm64.config.vocab_size, seed=3)
    groups = PromptGroups.of(prompts, completions, 0, CPU)
    with torch.no_grad():
        ids, mask = padded_batch([p + c for p, c in zip(prompts, completions)], 0)
        hidden = lm64.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(prompts)), mask.sum(1) - 1]
        torch.testing.assert_close(final_states(lm64.base_model, groups), last, rtol=0, atol=1e-10)


def test_sampling_ignores_the_checkpoints_own_sampling_defaults(tiny_lm_dir, tiny_lm):
    """A generation_config.json with a repetition penalty and a minimum length (as hub checkpoints ship) changes
    nothing: the samples are the SamplingConfig's alone (RL rollouts must come from the policy itself)."""
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    prompts = [[{"role": "user", "content": t}] for t in ("the quick brown fox", "a helpful", "the lazy dog jumps")]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, seed=5, batch_size=3)
    plain = sample_token_ids(tiny_lm, tokenizer, prompts, 4, sampling, progress=False)
    shipped = tiny_lm.generation_config
    tiny_lm.generation_config = copy.deepcopy(shipped)
    tiny_lm.generation_config.repetition_penalty = 5.0
    tiny_lm.generation_config.min_new_tokens = 8
    try:
        with_defaults = sample_token_ids(tiny_lm, tokenizer, prompts, 4, sampling, progress=False)
        assert tiny_lm.generation_config.repetition_penalty == 5.0  # put back after sampling
    finally:
        tiny_lm.generation_config = shipped
    assert [r.completions for r in with_defaults] == [r.completions for r in plain]


def test_sampling_k_per_prompt_gives_generates_own_samples(tiny_lm_dir, tiny_lm):
    """One prefill per prompt, then generate(): the same tokens as generate(num_return_sequences=k)."""
    tokenizer = load_tokenizer(str(tiny_lm_dir))
    prompts = [[{"role": "user", "content": t}] for t in ("the quick brown fox", "a helpful", "the lazy dog jumps")]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, seed=3, batch_size=3)
    ours = sample_token_ids(tiny_lm, tokenizer, prompts, 4, sampling, progress=False)

    tokenizer.padding_side = "left"
    texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(3)
    with torch.no_grad():
        output = tiny_lm.generate(
            **batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6, num_return_sequences=4
        )
    width = batch["input_ids"].shape[1]
    for row, rollouts in enumerate(ours):
        for j, completion in enumerate(rollouts.completions):
            assert completion == output[row * 4 + j, width : width + len(completion)].tolist()
