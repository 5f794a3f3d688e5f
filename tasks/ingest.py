"""Read preference data from files or Hugging Face datasets and convert each row to canonical messages.

Supported layouts (``format: auto`` picks from the columns):

- ``explicit``: TRL explicit prompt, ``prompt/chosen/rejected`` as strings or message lists.
- ``ultrafeedback``: UltraFeedback-binarized, ``prompt`` plus full conversations in ``chosen/rejected``
  (the prompt turns are stripped off) and ``score_chosen/score_rejected``.
- ``implicit``: TRL implicit prompt, ``chosen/rejected`` full conversations; the prompt is their longest
  common prefix that ends before an assistant turn.
- ``hh_rlhf``: Anthropic HH-RLHF transcripts (``\\n\\nHuman: ... \\n\\nAssistant: ...`` strings); the prompt is the
  common prefix up to the last shared ``\\n\\nAssistant:`` marker.

File-level damage (unparseable JSON, a missing column, an unreadable file) raises :class:`MalformedInputError`
naming the file and line/row. Row-level problems raise :class:`RowProblem`, which curation either re-raises as a
``MalformedInputError`` (strict) or quarantines.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from creditflow.storage.hashing import sha256_file
from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.schema import ROLES, Messages

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BUILTIN = {"sample": "sample_preferences.jsonl"}

_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"PK\x03\x04": "zip"}
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


def source_path(source: SourceConfig) -> Path | None:
    """The local file or folder of a source (the bundled file for ``builtin``); None for hub datasets."""
    if source.builtin:
        return Path(str(importlib.resources.files("creditflow.data") / BUILTIN[source.builtin]))
    return Path(source.path).expanduser().resolve() if source.path else None


# ---------------------------------------------------------------------------------------------------------
# Reading rows


def source_digest(source: SourceConfig) -> str:
    """Content digest of the source, so editing a file changes the curation fingerprint."""
    path = source_path(source)
    if path is not None and path.is_file():
        return sha256_file(path)
    snapshot = hub_dataset_snapshot(source)
    if snapshot is not None:  # a hub repo: its commit names its content
        return f"hub:{source.hf}@{snapshot.name}"
    return "hfds:" + _load_hf(source)._fingerprint


def hub_dataset_snapshot(source: SourceConfig) -> Path | None:
    """The HF-cache snapshot folder of an ``org/name`` hub dataset (HF_HUB_OFFLINE honoured); None for a builder
    name (``json``, ``parquet``, ...) or a local folder."""
    from creditflow.tasks.models import hub_snapshot, is_hub_id

    if not source.hf or not is_hub_id(source.hf):
        return None
    spec = f"{source.hf}@{source.revision}" if source.revision else source.hf
    try:
        return hub_snapshot(spec, repo_type="dataset")
    except ValueError as exc:
        raise MalformedInputError(source.label, None, None, str(exc)) from None


def row_total(source: SourceConfig) -> int | None:
    """How many rows ``read_rows`` will yield, when that is cheap to know (for progress bars); else None."""
    path = source_path(source)
    total = None
    if path is not None and path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            with open(path, "rb") as handle:
                total = sum(1 for line in handle if line.strip())
        elif suffix == ".parquet":
            try:
                total = pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowInvalid, OSError):
                return None
    return min(total, source.limit) if total is not None and source.limit is not None else total


def read_rows(source: SourceConfig) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    """Column names and an iterator of (location, row). Locations are ``line N`` or ``row N`` (both 1-based)."""
    path = source_path(source)
    if path is None or path.is_dir():
        return _hf_rows(source)
    if not path.exists():
        raise MalformedInputError(source.label, None, None, "file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(path, source.label)
    elif suffix == ".json":
        rows = _json_rows(path, source.label)
    elif suffix == ".parquet":
        return _table_rows(_read_parquet(path, source.label), source)
    elif suffix == ".csv":
        return _table_rows(_read_csv(path, source.label), source, json_cells=True)
    else:
        raise MalformedInputError(source.label, None, None, f"unsupported file type {suffix!r} (use {FILE_SUFFIXES})")
    rows = _limited(rows, source.limit)
    first = next(rows, None)
    if first is None:
        return [], iter(())
    return list(first[1]), _chain(first, rows)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _limited(rows: Iterator[Any], limit: int | None) -> Iterator[Any]:
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _check_not_compressed(path: Path, label: str) -> None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    for prefix, kind in _COMPRESSED_MAGIC.items():
        if magic.startswith(prefix):
            raise MalformedInputError(label, None, None, f"the file is {kind}-compressed; decompress it first")


def _decode_line(raw: bytes, label: str, location: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedInputError(
            label, location, None, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
        ) from None


def _parse_json(text: str, label: str, location: str | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = location or f"line {exc.lineno}"
        raise MalformedInputError(label, where, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise MalformedInputError(label, location, None, "JSON nested too deeply to be a preference row") from None


def _jsonl_rows(path: Path, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    _check_not_compressed(path, label)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode_line(raw, label, f"line {number}")
            if not line.strip():
                continue
            row = _parse_json(line, label, f"line {number}")
            if not isinstance(row, dict):
                raise MalformedInputError(
                    label, f"line {number}", None, f"expected a JSON object, got {type(row).__name__}"
                )
            yield f"line {number}", row


def _json_rows(path: Path, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    _check_not_compressed(path, label)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise MalformedInputError(label, f"line {line}", None, f"not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    data = _parse_json(text, label, None)
    if not isinstance(data, list):
        raise MalformedInputError(
            label, None, None, "a .json file must hold a list of row objects (use .jsonl for one object per line)"
        )
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise MalformedInputError(label, f"row {number}", None, f"expected an object, got {type(row).__name__}")
        yield f"row {number}", row


def _read_parquet(path: Path, label: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MalformedInputError(label, None, None, f"not a readable Parquet file ({exc})") from None


def _read_csv(path: Path, label: str) -> pa.Table:
    try:
        return pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MalformedInputError(label, None, None, f"not a readable CSV file ({exc})") from None


def _table_rows(table: pa.Table, source: SourceConfig, json_cells: bool = False):
    if source.limit is not None:
        table = table.slice(0, source.limit)

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        number = 0
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", {k: _maybe_json(v) for k, v in row.items()} if json_cells else row

    return table.column_names, rows()


def _maybe_json(value: Any) -> Any:
    """CSV cannot hold lists: a cell that is a JSON list of messages is decoded."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _load_hf(source: SourceConfig):
    import datasets

    try:
        if source.path:
            loaded = datasets.load_from_disk(str(source_path(source)))
        elif (snapshot := hub_dataset_snapshot(source)) is not None:  # resolved like models, through the HF cache
            loaded = datasets.load_dataset(str(snapshot), source.name, data_files=source.data_files, split=source.split)
        else:
            loaded = datasets.load_dataset(
                source.hf, source.name, data_files=source.data_files, split=source.split, revision=source.revision
            )
    except FileNotFoundError as exc:
        raise MalformedInputError(source.label, None, None, f"dataset not found ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise MalformedInputError(source.label, None, None, f"no split {source.split!r} (splits: {list(loaded)})")
        loaded = loaded[source.split]
    return loaded


def _hf_rows(source: SourceConfig):
    return _table_rows(_load_hf(source).with_format("arrow")[:], source)


# ---------------------------------------------------------------------------------------------------------
# Format detection and conversion


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


def has_columns(source: SourceConfig) -> bool:
    """Tables (Parquet, CSV, datasets) have columns to check up front. JSON rows only have keys (the "columns" are
    the first row's): :func:`convert_row` checks those row by row, so a bad first row is named by its line and can
    be quarantined like any other."""
    path = source_path(source)
    return path is None or path.is_dir() or path.suffix.lower() not in (".jsonl", ".json")


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
    return float(value)
