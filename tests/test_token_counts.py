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
# Code points whose class (letter, number, space, other) decides pre-token bounds, across scripts and Unicode ages:
# accents and combining marks, non-ASCII digits and spaces, CJK, emoji, the long s that folds to s, unassigned ones.
UNICODE = [
    chr(c)
    for c in (
        *range(0xA0, 0x180),
        *range(0x300, 0x370),
        0x660,
        0x6F3,
        0x966,
        0x2000,
        0x2028,
        0x3000,
        0xFEFF,
        0x4E00,
        0x6570,
        0xAC00,
        0x1F600,
        0x1F44D,
        0x200D,
        0x17F,
        0x212A,
        0x10FFFD,
        0xE0001,
        0x1FAFF,
        0x2FFFF,
    )
]


def _train(pre_tokenizer, normalizer=None, **options) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=CHATML_TEMPLATE,
        **options,
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
        "split-special": _train(pre_tokenizers.ByteLevel(add_prefix_space=False), split_special_tokens=True),
        "no-pre-tokenizer": _train(None),
    }


def random_texts(n: int, seed: int = 0, alphabet: list[str] = PIECES) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(n)]


def reference(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@pytest.mark.parametrize("kind", ["gpt2-style", "llama3-style"])
def test_byte_level_bpe_counts_equal_the_tokenizers(tokenizers, kind):
    tokenizer = tokenizers[kind]
    counter = TokenCounter(tokenizer)
    assert counter.fast
    ascii_texts = random_texts(3000) + CORPUS[:3]
    other = NON_ASCII + random_texts(1000, seed=3, alphabet=PIECES + UNICODE)
    other = [t for t in other if not t.isascii()]
    assert counter.count(ascii_texts + other) == reference(tokenizer, ascii_texts + other)
    # ASCII text went through the pattern, the rest through the tokenizer's pre-tokenizer.
    assert (counter.texts_by_pattern, counter.texts_by_pre_tokenizer) == (len(ascii_texts), len(other))


@pytest.mark.parametrize("kind", ["prefix-space", "normalizer", "split-special", "no-pre-tokenizer"])
def test_other_tokenizers_are_counted_by_the_tokenizer_itself(tokenizers, kind):
    tokenizer = tokenizers[kind]
    counter = TokenCounter(tokenizer)
    assert not counter.fast
    texts = random_texts(300) + NON_ASCII
    assert counter.count(texts) == reference(tokenizer, texts)
    assert counter.texts_by_pattern == counter.texts_by_pre_tokenizer == 0


def test_prompt_and_completion_lengths_are_those_of_the_shared_tokenization(tokenizers):
    tokenizer = tokenizers["gpt2-style"]
    texts = random_texts(200, seed=1)
    prompts = [[{"role": "user", "content": t}] for t in texts]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    counter = TokenCounter(tokenizer)
    assert counter.prompt_lengths(prompts) == [len(ids) for ids in encode_prompts(tokenizer, prompts)]
    assert counter.completion_lengths(completions) == [len(ids) for ids in encode_completions(tokenizer, completions)]
    assert all(completion_text(c).isascii() for c in completions) and counter.texts_by_pattern == 400


def test_a_full_cache_starts_over_and_stays_exact(tokenizers, monkeypatch):
    monkeypatch.setattr("creditflow.tasks.models.token_counts.CACHE_LIMIT", 20)
    tokenizer = tokenizers["gpt2-style"]
    counter = TokenCounter(tokenizer)
    texts = random_texts(500, seed=2)
    assert counter.count(texts) == reference(tokenizer, texts)
    most_pieces = max(len(counter._pattern.findall(text)) for text in texts)
    assert len(counter._by_piece) <= 20 + most_pieces  # checked before each text, which adds at most its pieces
    assert len(counter._by_piece) < len({piece for text in texts for piece in counter._pattern.findall(text)})
    for start in range(0, len(texts), 10):
        batch = texts[start : start + 10]
        assert counter.count(batch) == reference(tokenizer, batch)
