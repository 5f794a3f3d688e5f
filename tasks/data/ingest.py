"""Read preference data from files (JSONL, JSON, Parquet, CSV) or Hugging Face datasets, row by row, with the file
and line/row of each; tasks/data/formats.py turns each row into canonical messages.

File-level damage (unparseable JSON, a missing column, an unreadable file) raises :class:`MalformedInputError`
naming the file and line/row.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from creditflow.storage.hashing import sha256_file
from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.models.hub import hub_snapshot, is_hub_id

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BUILTIN = {"sample": "sample_preferences.jsonl"}

_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"PK\x03\x04": "zip"}


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
                location = f"row {number}"
                if json_cells:
                    row = {k: _csv_cell(v, source.label, location, k) for k, v in row.items()}
                yield location, row

    return table.column_names, rows()


def _csv_cell(value: Any, label: str, location: str, field: str) -> Any:
    """One CSV cell as text; CSV cannot hold lists, so a cell that is a JSON list of messages is decoded."""
    if isinstance(value, bytes):  # Arrow types a whole column as binary when any of its cells is not UTF-8
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {value[exc.start]:#04x} at position {exc.start + 1} of the cell)"
            raise MalformedInputError(label, location, field, problem) from None
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
        except RecursionError:
            raise MalformedInputError(label, location, field, "JSON nested too deeply to be a preference row") from None
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


def has_columns(source: SourceConfig) -> bool:
    """Tables (Parquet, CSV, datasets) have columns to check up front. JSON rows only have keys (the "columns" are
    the first row's): :func:`convert_row` checks those row by row, so a bad first row is named by its line and can
    be quarantined like any other."""
    path = source_path(source)
    return path is None or path.is_dir() or path.suffix.lower() not in (".jsonl", ".json")
