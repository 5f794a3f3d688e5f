"""Exact token counts for curation's length rules, at regex speed for byte-level BPE tokenizers.

A byte-level BPE tokenizer (GPT-2, SmolLM, Llama 3, Qwen 2) splits text into pre-tokens with one regex and runs BPE
on each pre-token alone, so a text's token count is the sum of its pre-tokens' counts. Text mostly repeats its
pre-tokens (words), so :class:`TokenCounter` splits each text with the tokenizer's own pattern and counts each
distinct pre-token once, with the tokenizer's own BPE model on the piece's bytes in its byte-level alphabet. That
skips what ``encode()`` spends most of its time on here (offsets, alignments, an ``Encoding`` per text): 3-4x the
texts per second on one core on English-like text, and still faster when every word is new (docs/benchmarks.md).

ASCII text is split with the pattern in Python (``regex``), which agrees with the tokenizer's Oniguruma there; other
text is split by the tokenizer's own pre-tokenizer, since the two engines' Unicode tables (what ``\\p{L}`` or ``\\s``
match) may differ, and each distinct piece is again run through BPE once. Tokenizers of another kind (a normalizer, a
prefix space, SentencePiece, a slow tokenizer) count every text themselves.
"""

from __future__ import annotations

import json
from typing import Any

import regex
from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerBase

from creditflow.tasks.data.schema import Messages
from creditflow.tasks.models.tokenization import completion_texts, render_prompts

# The pattern of the ByteLevel pre-tokenizer with ``use_regex``: GPT-2's (tokenizers' byte_level.rs).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The byte-level alphabet's character for each ASCII byte (GPT-2's bytes_to_unicode), from the tokenizers library.
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
BYTE_LEVEL_ASCII = {byte: _BYTE_LEVEL.pre_tokenize_str(chr(byte))[0][0] for byte in range(128)}
CACHE_LIMIT = 200_000  # distinct pre-tokens kept (a few tens of MB); the cache starts over past it


class TokenCounter:
    """``len(tokenizer(text, add_special_tokens=False).input_ids)`` for each text, the same numbers faster."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None
        # split_special_tokens: special tokens in the text are encoded as text, not matched (transformers' option)
        matches_special = backend is not None and not getattr(tokenizer, "split_special_tokens", False)
        plan = _byte_level_plan(json.loads(backend.to_str())) if matches_special else None
        self._pattern, self._special, self._normalized = plan or (None, None, None)
        self._pre_tokenize = self._bpe = None
        if plan is not None and backend is not None:
            self._pre_tokenize, self._bpe = backend.pre_tokenizer.pre_tokenize_str, backend.model.tokenize
        # Token counts by ASCII pre-token, and by pre-token as the tokenizer's pre-tokenizer gives it (mapped bytes).
        self._by_piece: dict[str, int] = {}
        self._by_mapped_piece: dict[str, int] = {}
        self.texts_by_pattern = self.texts_by_pre_tokenizer = 0  # which path counted how many (tests check both)

    @property
    def fast(self) -> bool:
        """Whether texts are counted from their pre-tokens (a byte-level BPE tokenizer), not by the tokenizer."""
        return self._pattern is not None

    def count(self, texts: list[str]) -> list[int]:
        if not self.fast:
            return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [self._count(text) for text in texts]

    def prompt_lengths(self, prompts: list[Messages]) -> list[int]:
        """Token counts of ``encode_prompts``: the chat-templated prompt with its generation prompt."""
        return self.count(render_prompts(self.tokenizer, prompts))

    def completion_lengths(self, completions: list[Messages]) -> list[int]:
        """Token counts of ``encode_completions``: the completion text, then EOS."""
        return [n + 1 for n in self.count(completion_texts(self.tokenizer, completions))]

    def _count(self, text: str) -> int:
        if len(self._by_piece) + len(self._by_mapped_piece) > CACHE_LIMIT:  # checked per text: one batch can be big
            self._by_piece.clear()
            self._by_mapped_piece.clear()
        if text.isascii():
            self.texts_by_pattern += 1
            count_gap = self._ascii_gap
        else:
            self.texts_by_pre_tokenizer += 1
            count_gap = self._pre_tokenized_gap
        # Added tokens are matched first, special (unnormalized) ones before the others, as the tokenizer does.
        total = 0
        for is_gap, part in _split(self._special, text):
            if not is_gap:
                total += 1
                continue
            total += sum(count_gap(gap) if inner else 1 for inner, gap in _split(self._normalized, part))
        return total

    def _ascii_gap(self, text: str) -> int:
        pieces = self._pattern.findall(text)  # pyright: ignore[reportOptionalMemberAccess]
        if sum(map(len, pieces)) != len(text):
            return self._pre_tokenized_gap(text)  # the pattern leaves gaps: the tokenizer's own split decides
        try:
            return sum(map(self._by_piece.__getitem__, pieces))
        except KeyError:
            return sum(map(self._ascii_piece, pieces))

    def _ascii_piece(self, piece: str) -> int:
        count = self._by_piece.get(piece)
        if count is None:  # BPE on the piece's bytes, in the byte-level alphabet, as the tokenizer runs it
            count = self._by_piece[piece] = len(self._bpe(piece.translate(BYTE_LEVEL_ASCII)))  # pyright: ignore[reportOptionalCall]
        return count

    def _pre_tokenized_gap(self, text: str) -> int:
        """Any text: the tokenizer's own pre-tokenizer splits it, and each distinct piece is run through BPE once."""
        total = 0
        for piece, _ in self._pre_tokenize(text):  # pyright: ignore[reportOptionalCall]
            count = self._by_mapped_piece.get(piece)
            if count is None:
                count = self._by_mapped_piece[piece] = len(self._bpe(piece))  # pyright: ignore[reportOptionalCall]
            total += count
        return total


def _split(added: regex.Pattern | None, text: str):
    """(True, text between added tokens) and (False, an added token), in order."""
    if added is None:
        yield True, text
        return
    end = 0
    for match in added.finditer(text):
        if match.start() > end:
            yield True, text[end : match.start()]
        yield False, match.group()
        end = match.end()
    if end < len(text):
        yield True, text[end:]


def _byte_level_plan(spec: dict[str, Any]) -> tuple[regex.Pattern, regex.Pattern | None, regex.Pattern | None] | None:
    """(pre-token pattern, special-token pattern, other added-token pattern) when the tokenizer is a byte-level BPE
    whose count is the sum of its pre-tokens' counts; None for any other kind."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        pattern = GPT2_PATTERN
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        if not (
            split.get("type") == "Split"
            and "Regex" in split.get("pattern", {})
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            return None
        pattern = split["pattern"]["Regex"]
    else:
        return None
    try:
        compiled = regex.compile(pattern)
    except regex.error:
        return None
    added = spec.get("added_tokens") or []
    if compiled.groups or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None  # findall would return groups; stripping and word bounds change where added tokens match
    return (
        compiled,
        _alternation([t["content"] for t in added if not t.get("normalized")]),
        _alternation([t["content"] for t in added if t.get("normalized")]),
    )


def _alternation(contents: list[str]) -> regex.Pattern | None:
    """Leftmost-longest match of any of ``contents`` (longest first, as the tokenizer's Aho-Corasick prefers)."""
    if not contents:
        return None
    return regex.compile("|".join(regex.escape(c) for c in sorted(set(contents), key=len, reverse=True)))
