"""The preference-data layouts and how one row of each becomes canonical (prompt, chosen, rejected) messages.

Supported layouts (``format: auto`` picks from the columns):

- ``explicit``: TRL explicit prompt, ``prompt/chosen/rejected`` as strings or message lists.
- ``ultrafeedback``: UltraFeedback-binarized, ``prompt`` plus full conversations in ``chosen/rejected``
  (the prompt turns are stripped off) and ``score_chosen/score_rejected``.
- ``implicit``: TRL implicit prompt, ``chosen/rejected`` full conversations; the prompt is their longest
  common prefix that ends before an assistant turn.
- ``hh_rlhf``: Anthropic HH-RLHF transcripts (``\\n\\nHuman: ... \\n\\nAssistant: ...`` strings); the prompt is the
  common prefix up to the last shared ``\\n\\nAssistant:`` marker.

Columns that fit no layout raise :class:`MalformedInputError` (also what tasks/data/ingest.py raises for file-level
damage), naming the file and field. Row-level problems raise :class:`RowProblem`, which curation either re-raises
as a ``MalformedInputError`` naming the line/row (strict) or quarantines.
"""

from __future__ import annotations

import math
import re
from typing import Any

from creditflow.tasks.data.schema import ROLES, Messages

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


class MalformedInputError(ValueError):
    """Input that cannot be read as preference data; the message names file, line/row and field."""

    def __init__(self, source: str, location: str | None, field: str | None, message: str):
        self.source, self.location, self.field = source, location, field
        where = ": ".join(part for part in (source, location, f"field {field!r}" if field else None) if part)
        super().__init__(f"{where}: {message}")


class RowProblem(ValueError):
    """One row violates the schema; ``field`` names the offending column."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def detect_format(columns: list[str], label: str) -> str:
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "ultrafeedback" if {"score_chosen", "score_rejected"} <= cols else "explicit"
    if {"chosen", "rejected"} <= cols:
        return "implicit"
    raise MalformedInputError(
        label,
        None,
        None,
        f"cannot tell the preference format from columns {sorted(cols)}: "
        "expected prompt/chosen/rejected (explicit, UltraFeedback) or chosen/rejected (implicit, HH-RLHF)",
    )


REQUIRED = {
    "explicit": ("prompt", "chosen", "rejected"),
    "ultrafeedback": ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"),
    "implicit": ("chosen", "rejected"),
    "hh_rlhf": ("chosen", "rejected"),
}


def check_columns(fmt: str, columns: list[str], label: str) -> None:
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing and columns:
        raise MalformedInputError(
            label, None, missing[0], f"missing column for format {fmt!r} (columns: {sorted(columns)})"
        )


def convert_row(fmt: str, row: dict[str, Any]) -> tuple[Messages, Messages, Messages, float | None, float | None]:
    """(prompt, chosen, rejected, score_chosen, score_rejected) in canonical messages, or :class:`RowProblem`."""
    for field in REQUIRED[fmt]:
        if field not in row:
            raise RowProblem(field, "missing")
    if fmt in ("explicit", "ultrafeedback"):
        prompt = to_messages(row["prompt"], "prompt", "user")
        chosen = _strip_prompt(prompt, to_messages(row["chosen"], "chosen", "assistant"), "chosen")
        rejected = _strip_prompt(prompt, to_messages(row["rejected"], "rejected", "assistant"), "rejected")
    else:
        prompt, chosen, rejected = _split_implicit(row["chosen"], row["rejected"], hh_only=fmt == "hh_rlhf")
    return prompt, chosen, rejected, _score(row, "score_chosen"), _score(row, "score_rejected")


def _check_encodable(text: str, field: str) -> None:
    """JSON can spell lone surrogates (``"\\ud800"``), which no UTF-8 writer accepts: refuse them at the row."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problem = f"invalid Unicode (a lone surrogate {text[exc.start]!a} at character {exc.start})"
        raise RowProblem(field, problem) from None


def to_messages(value: Any, field: str, default_role: str) -> Messages:
    if isinstance(value, str):
        _check_encodable(value, field)
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise RowProblem(field, f"expected a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise RowProblem(field, "empty message list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowProblem(f"{field}[{i}]", f"expected a message object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowProblem(f"{field}[{i}].role", f"expected one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise RowProblem(f"{field}[{i}].content", f"expected a string, got {type(content).__name__}")
        _check_encodable(content, f"{field}[{i}].content")
        messages.append({"role": role, "content": content})
    return messages


def _strip_prompt(prompt: Messages, completion: Messages, field: str) -> Messages:
    """UltraFeedback-style rows repeat the prompt turns at the start of chosen/rejected."""
    if len(completion) > len(prompt) and completion[: len(prompt)] == prompt:
        completion = completion[len(prompt) :]
    if completion[0]["role"] != "assistant":
        raise RowProblem(field, f"the completion must start with an assistant turn, got {completion[0]['role']!r}")
    return completion


def _split_implicit(chosen: Any, rejected: Any, hh_only: bool) -> tuple[Messages, Messages, Messages]:
    if isinstance(chosen, str) and isinstance(rejected, str):
        # Transcripts skip to_messages, which refuses lone surrogates for every other layout.
        _check_encodable(chosen, "chosen")
        _check_encodable(rejected, "rejected")
        return _split_hh(chosen, rejected)
    if hh_only:
        raise RowProblem("chosen", "hh_rlhf rows must be transcript strings")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowProblem("rejected", "chosen and rejected must both be strings or both message lists")
    c = to_messages(chosen, "chosen", "assistant")
    r = to_messages(rejected, "rejected", "assistant")
    shared = 0
    while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
        shared += 1
    while shared > 0 and not (c[shared]["role"] == r[shared]["role"] == "assistant"):
        shared -= 1
    if shared == 0:
        raise RowProblem("chosen", "chosen and rejected share no prompt turns before an assistant turn")
    return c[:shared], c[shared:], r[shared:]


def _split_hh(chosen: str, rejected: str) -> tuple[Messages, Messages, Messages]:
    limit = 0
    while limit < min(len(chosen), len(rejected)) and chosen[limit] == rejected[limit]:
        limit += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, limit)
    if cut < 0 or not _HH_TURN.search(chosen):
        raise RowProblem(
            "chosen", "no shared '\\n\\nAssistant:' marker: implicit-prompt strings must be HH-RLHF transcripts"
        )
    end = cut + len(_HH_ASSISTANT)
    prompt = _parse_hh(chosen[:end])
    if not prompt:
        raise RowProblem("chosen", "the transcript has no turns before the last assistant marker")
    strip = lambda text: text[1:] if text.startswith(" ") else text  # noqa: E731 - the space after "Assistant:"
    return (
        prompt,
        [{"role": "assistant", "content": strip(chosen[end:])}],
        [{"role": "assistant", "content": strip(rejected[end:])}],
    )


def _parse_hh(transcript: str) -> Messages:
    parts = _HH_TURN.split(transcript)  # [preamble, role, text, role, text, ...]
    messages = []
    for role, text in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the open "Assistant:" marker the completion follows
    return messages


def _score(row: dict[str, Any], field: str) -> float | None:
    """The score as a float, None when absent; NaN and infinities stay as they are (curation quarantines them)."""
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem(field, f"expected a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range: infinite, as JSON reads 1e400
        return math.inf if value > 0 else -math.inf
