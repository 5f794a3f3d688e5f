"""TokenCounter (tasks/models/token_counts.py): the tokenizer's own counts, from its pre-tokens where it may."""

from __future__ import annotations

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from creditflow.tasks.data.schema import completion_text
from creditflow.tasks.models.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tiny_tokenizer
from creditflow.tasks.models.token_counts import TokenCounter
from creditflow.tasks.models.tokenization import encode_completions, encode_prompts

# Llama 3's and Qwen 2's pre-token pattern: a Split before a ByteLevel without its own regex.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 12345 foxes!",
    "Hello, world: what's up?\n\nNot much -- just testing   spaces\tand tabs.",
    "I'd say THE ANSWER is 42; you've known it, haven't you? (Yes.) [x] {y} <z> a_b c-d e/f",
] * 20
# Every ASCII character (control ones too), and pieces that stress the pre-token rules: whitespace runs before words
# and at the end, contractions in both cases, digit runs, punctuation runs, newlines after punctuation, special tokens
# whole and cut in half.
PIECES = [chr(c) for c in range(128)] + [
    "\n", "\t", "\r", "\x0b", "\x0c", "  ", "   ", "\n\n", " \n", "'s", "'S", "'ll", "'LL", "'d", "'re",
    "123", "4567", "...", "?!", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_", "fox", " dog", "It's",
]  # fmt: skip
NON_ASCII = ["café", "naïve 😀 emoji", "non\u00a0breaking", "line\u2028separator", "Ünïcödé  ", "数字 123"]


def _train(pre_tokenizer, normalizer=None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE
    )


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    llama3_style = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return {
        "gpt2-style": build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, vocab_size=300),
        "llama3-style": _train(llama3_style),
        "prefix-space": _train(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "normalizer": _train(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.Lowercase()),
    }


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(PIECES, k=rng.randint(0, 40))) for _ in range(n)]


def reference(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("kind", ["gpt2-style", "llama3-style"])
def test_byte_level_bpe_counts_equal_the_tokenizers_and_skip_it_for_ascii(tokenizers, kind):
    tokenizer = tokenizers[kind]
    counter = TokenCounter(tokenizer)
    assert counter.fast
    texts = random_texts(3000) + CORPUS[:3] + NON_ASCII
    assert counter.count(texts) == reference(tokenizer, texts)
    assert counter.texts_counted_fast == len(texts) - len(NON_ASCII)  # the fast path ran, except off ASCII


@pytest.mark.parametrize("kind", ["prefix-space", "normalizer"])
def test_other_tokenizers_are_counted_by_the_tokenizer_itself(tokenizers, kind):
    tokenizer = tokenizers[kind]
    counter = TokenCounter(tokenizer)
    assert not counter.fast
    texts = random_texts(300) + NON_ASCII
    assert counter.count(texts) == reference(tokenizer, texts)
    assert counter.texts_counted_fast == 0


def test_prompt_and_completion_lengths_are_those_of_the_shared_tokenization(tokenizers):
    tokenizer = tokenizers["gpt2-style"]
    texts = random_texts(200, seed=1)
    prompts = [[{"role": "user", "content": t}] for t in texts]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    counter = TokenCounter(tokenizer)
    assert counter.prompt_lengths(prompts) == [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    assert counter.completion_lengths(completions) == [len(ids) for ids in encode_completions(tokenizer, completions)]
    assert all(completion_text(c).isascii() for c in completions) and counter.texts_counted_fast == 400


def test_a_full_cache_starts_over_and_stays_exact(tokenizers, monkeypatch):
    monkeypatch.setattr("creditflow.tasks.models.token_counts.CACHE_LIMIT", 20)
    tokenizer = tokenizers["gpt2-style"]
    counter = TokenCounter(tokenizer)
    texts = random_texts(500, seed=2)
    assert counter.count(texts) == reference(tokenizer, texts)
    assert len(counter._cache) <= 20 + 40  # cleared before a text, which adds at most its own pieces
