"""The canonical preference-pair schema every stage reads, and the message helpers that build it."""

from __future__ import annotations

import unicodedata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from creditflow.storage.hashing import sha256_json

ROLES = ("system", "user", "assistant", "tool")
SIDES = ("chosen", "rejected")  # the two completions of a pair
ID_CHARS = 20  # 80-bit ids: collision-free far beyond any preference set we will see
ID_BYTES = ID_CHARS // 2  # an id as bytes (bytes.fromhex), as compact state keeps it

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

PAIRS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("margin", pa.float64()),
        ("prompt_tokens", pa.int32()),
        ("chosen_tokens", pa.int32()),
        ("rejected_tokens", pa.int32()),
        ("source", pa.string()),
        ("source_row", pa.string()),
        ("split", pa.string()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("source_row", pa.string()),
        ("rule", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("pair_id", pa.string()),
        ("raw", pa.string()),
    ]
)

Messages = list[dict[str, str]]


def normalize_text(text: str) -> str:
    """Whitespace-insensitive form used for ids and dedupe (case and punctuation are kept: they change meaning)."""
    return " ".join(text.split())


# Characters that render as nothing but are not Unicode whitespace (fillers that print blank).
_INVISIBLE = {"\u2800", "\u3164", "\u115f", "\u1160", "\uffa0"}


# Format and control characters, space separators, and marks: a mark (a variation selector, the combining grapheme
# joiner, an accent) only modifies a base character, so with no base there is nothing to show.
_BLANK_CATEGORIES = ("Cf", "Cc", "Zs", "Mn", "Me")


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: whitespace, zero-width, marks and other format or control characters only."""
    return all(ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in _BLANK_CATEGORIES for ch in text)


def exact_key(messages: Messages) -> tuple[tuple[str, str], ...]:
    """A hashable key of the messages as written (no normalization: texts that tokenize differently stay apart)."""
    return tuple((m["role"], m["content"]) for m in messages)


def messages_key(messages: Messages) -> list[tuple[str, str]]:
    return [(m["role"], normalize_text(m["content"])) for m in messages]


def prompt_id(prompt: Messages) -> str:
    return sha256_json(messages_key(prompt))[:ID_CHARS]


def pair_id(prompt: Messages, chosen: Messages, rejected: Messages) -> str:
    return sha256_json([messages_key(prompt), messages_key(chosen), messages_key(rejected)])[:ID_CHARS]


def pair_keys(prompt: Messages, chosen: Messages, rejected: Messages) -> tuple[str, str, bool]:
    """(pair id, prompt id, whether chosen == rejected after whitespace normalization): each side normalized once."""
    p, c, r = messages_key(prompt), messages_key(chosen), messages_key(rejected)
    return sha256_json([p, c, r])[:ID_CHARS], sha256_json(p)[:ID_CHARS], c == r


def completion_text(messages: Messages) -> str:
    return "\n".join(m["content"] for m in messages)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def split_rows(pairs: pa.Table, split: str) -> pa.Table:
    """The rows of one split ("train" or "eval") of a pairs table."""
    return pairs.filter(pc.equal(pairs.column("split"), split))


def unique_prompts(pairs: pa.Table, limit: int | None) -> pa.Table:
    """One row per prompt id (first occurrence), keeping prompt messages and split."""
    seen: set[str] = set()
    keep = []
    for index, prompt_id in enumerate(pairs.column("prompt_id").to_pylist()):
        if prompt_id not in seen:
            seen.add(prompt_id)
            keep.append(index)
    table = pairs.select(["prompt_id", "prompt", "split"]).take(keep)
    return table.slice(0, limit) if limit is not None else table
