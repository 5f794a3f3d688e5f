"""Read preference data from files (JSONL, JSON, Parquet, CSV) or Hugging Face datasets, row by row, with the file
and line/row of each; tasks/data/formats.py turns each row into canonical messages.

JSONL, JSON and CSV files may be compressed (gzip, bzip2, xz, zstd), recognised by their magic bytes whatever their
name says (``train.jsonl.gz`` is JSONL). A ``path`` may name a folder of data files or a glob of shards
(``data/train_prefs-*.parquet``): its files are read in sorted order as one source, and each row's location names
its shard, ``train_prefs-00001-of-00002.parquet row 17``. A folder written by ``datasets.save_to_disk`` is read
as a dataset. Rows stream: tables in record batches, text files line by line.

File-level damage (unparseable JSON, a missing column, an unreadable or truncated file) raises
:class:`MalformedInputError` naming the file and line/row.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import importlib.resources
import io
import json
import lzma
import os
from collections import Counter
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import zstandard

from creditflow.storage.hashing import sha256_file, sha256_text
from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.models.hub import hub_snapshot, is_hub_id

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
SCORE_COLUMNS = ("score_chosen", "score_rejected")  # the only CSV cells read as numbers
BUILTIN = {"sample": "sample_preferences.jsonl"}
TABLE_BATCH_ROWS = 4096
COLUMN_SAMPLE_ROWS = 100  # JSON rows whose keys stand for the columns: one bad row cannot set the file's format
# pyarrow parses a CSV a block at a time and refuses a row longer than a block: its default, 1 MiB, is less than
# one long answer can take. A block's rows still become Python objects TABLE_BATCH_ROWS at a time.
CSV_BLOCK_BYTES = 64 << 20
ZSTD_READ_BYTES = 1 << 16  # compressed bytes decompressed at a time

_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}
_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_DAMAGED = (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)  # what a truncated or corrupt stream raises


def source_path(source: SourceConfig) -> Path | None:
    """The local file, folder or glob of a source (the bundled file for ``builtin``); None for hub datasets."""
    if source.builtin:
        return Path(str(importlib.resources.files("creditflow.data") / BUILTIN[source.builtin]))
    return Path(source.path).expanduser().resolve() if source.path else None


def source_files(source: SourceConfig) -> list[Path] | None:
    """The data files a source reads, in order: its one file, a folder's data files (recursively) or a glob's
    matches, sorted; None for a dataset (hub id, ``datasets`` builder or a ``save_to_disk`` folder)."""
    path = source_path(source)
    if path is None:
        return None
    if source.path and glob.has_magic(source.path):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise MalformedInputError(source.label, None, None, "the pattern matches no file")
        return files
    if path.is_dir():
        if any((path / name).exists() for name in _SAVED_DATASET_FILES):
            return None
        files = sorted(p for p in path.rglob("*") if p.is_file() and data_suffix(p) in FILE_SUFFIXES)
        if not files:
            raise MalformedInputError(
                source.label, None, None, f"the folder holds no data files ({', '.join(FILE_SUFFIXES)}, or compressed)"
            )
        return files
    if not path.exists():
        raise MalformedInputError(source.label, None, None, "file does not exist")
    return [path]


def data_suffix(path: Path) -> str:
    """The data format's suffix, compression suffixes aside: '.jsonl' for ``train.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else path.suffix.lower()


def compression(path: Path, label: str) -> str | None:
    """The file's compression by its magic bytes (None: plain); a zip archive is refused."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    kind = next((kind for prefix, kind in _MAGIC.items() if magic.startswith(prefix)), None)
    if kind == "zip":
        raise MalformedInputError(label, None, None, "the file is a zip archive; extract it first")
    return kind


def open_binary(path: Path, kind: str | None) -> IO[bytes]:
    """The file's bytes, decompressed as ``kind`` says."""
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bzip2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    if kind == "zstd":
        return io.BufferedReader(_ZstdFrames(path))
    return open(path, "rb")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a zstd file. zstandard's ``stream_reader`` stops without a word
    where a truncated file ends inside a frame; this raises ``ZstdError`` there, as gzip, bz2 and lzma do."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # some of the current frame was read, not yet its end
        self._pending = memoryview(b"")  # decompressed, not yet returned

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = self._file.read(ZSTD_READ_BYTES)
            if not chunk:
                if self._in_frame:
                    raise zstandard.ZstdError("the file ends inside a frame (truncated)")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, chunk: bytes) -> bytes:
        output = []
        while chunk:
            output.append(self._frame.decompress(chunk))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            chunk = self._frame.unused_data  # the next frame's start
            self._frame = self._decompressor.decompressobj()  # one object decodes one frame
        return b"".join(output)

    def close(self) -> None:
        self._file.close()
        super().close()


# ---------------------------------------------------------------------------------------------------------
# What a source is


def source_digest(source: SourceConfig) -> str:
    """Content digest of the source, so editing a file (or adding a shard) changes the curation fingerprint."""
    files = source_files(source)
    if files is not None:
        if len(files) == 1 and not _is_sharded(source):
            return sha256_file(files[0])
        root = _shard_root(source, files)
        return sha256_text("\n".join(f"{f.relative_to(root).as_posix()}:{sha256_file(f)}" for f in files))
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


def has_columns(source: SourceConfig) -> bool:
    """Tables (Parquet, CSV, datasets) have columns to check up front. JSON rows only have keys (the "columns" are
    the first row's): :func:`convert_row` checks those row by row, so a bad first row is named by its line and can
    be quarantined like any other."""
    files = source_files(source)
    return files is None or data_suffix(files[0]) not in (".jsonl", ".json")


def row_total(source: SourceConfig) -> int | None:
    """How many rows ``read_rows`` will yield, when that is cheap to know (for progress bars); else None."""
    files = source_files(source)
    if files is None:
        return None
    total = 0
    for path in files:
        count = _file_row_total(path)
        if count is None:
            return None
        total += count
    return min(total, source.limit) if source.limit is not None else total


def _file_row_total(path: Path) -> int | None:
    suffix = data_suffix(path)
    if suffix == ".parquet":
        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError):
            return None
    if suffix == ".jsonl" and compression(path, str(path)) is None:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None  # compressed text and CSV: unknown without decompressing or parsing it all


def _is_sharded(source: SourceConfig) -> bool:
    return bool(source.path) and (glob.has_magic(source.path) or Path(source.path).expanduser().is_dir())


def _shard_root(source: SourceConfig, files: list[Path]) -> Path:
    path = source_path(source)
    if path is not None and path.is_dir():
        return path
    return Path(os.path.commonpath([f.parent for f in files]))


# ---------------------------------------------------------------------------------------------------------
# Reading rows


def source_shards(source: SourceConfig) -> list[tuple[Path, str]] | None:
    """(file, location prefix) of each file a source reads, in order; None for a dataset. The prefix is empty for a
    single file and names the shard (``train-00001.parquet ``) in a folder or glob."""
    files = source_files(source)
    if files is None:
        return None
    if not _is_sharded(source):
        return [(files[0], "")]
    root = _shard_root(source, files)
    return [(f, f"{f.relative_to(root).as_posix()} ") for f in files]


def read_rows(source: SourceConfig) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    """Column names and an iterator of (location, row). Locations are ``line N`` or ``row N`` (both 1-based),
    after the shard's name for a folder or glob."""
    shards = source_shards(source)
    if shards is None:
        return _hf_rows(source)
    columns, first_rows = shard_rows(*shards[0], source.label)

    def chained() -> Iterator[tuple[str, dict[str, Any]]]:
        yield from first_rows
        for path, prefix in shards[1:]:
            yield from shard_rows(path, prefix, source.label, columns)[1]

    rows = _limited(chained(), source.limit)
    if columns is not None:
        return columns, rows
    head = list(islice(rows, COLUMN_SAMPLE_ROWS))  # JSON: the keys most of the first rows have are the columns
    keys = Counter(key for _, row in head for key in row)
    return [key for key, count in keys.items() if 2 * count > len(head)], chain(head, rows)


def shard_rows(
    path: Path, prefix: str, label: str, first_columns: list[str] | None = None
) -> tuple[list[str] | None, Iterator[tuple[str, dict[str, Any]]]]:
    """(columns or None for JSON, rows) of one data file; a table whose columns differ from ``first_columns`` (the
    first shard's) is refused."""
    suffix, kind, where = data_suffix(path), compression(path, label), prefix.strip() or None
    if suffix == ".jsonl":
        return None, _jsonl_rows(path, kind, label, prefix)
    if suffix == ".json":
        return None, _json_rows(path, kind, label, prefix)
    if suffix == ".parquet":
        if kind is not None:
            raise MalformedInputError(label, where, None, f"{kind}-compressed Parquet: decompress it")
        columns, rows = _parquet_rows(path, label, prefix)
    elif suffix == ".csv":
        columns, rows = _csv_rows(path, kind, label, prefix)
    else:
        raise MalformedInputError(
            label, where, None, f"unsupported file type {suffix!r} (use {FILE_SUFFIXES}, or compressed)"
        )
    if first_columns is not None and set(columns) != set(first_columns):
        problem = f"columns {sorted(columns)} differ from the first shard's {sorted(first_columns)}"
        raise MalformedInputError(label, where, None, problem)
    return columns, rows


def _limited(rows: Iterator[Any], limit: int | None) -> Iterator[Any]:
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _decode_line(raw: bytes, label: str, location: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedInputError(
            label, location, None, f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
        ) from None


def _parse_json(text: str, label: str, location: str | None, prefix: str = "") -> Any:
    """``location`` names a JSONL line; None for a whole .json file, whose errors name the line in it after
    ``prefix`` (the shard) where they can."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line = location or f"{prefix}line {exc.lineno}"
        raise MalformedInputError(label, line, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError:  # plain, without a position: an integer longer than Python converts
        problem = "invalid JSON (an integer of too many digits to convert)"
        raise MalformedInputError(label, location or prefix.strip() or None, None, problem) from None
    except RecursionError:
        problem = "JSON nested too deeply to be a preference row"
        raise MalformedInputError(label, location or prefix.strip() or None, None, problem) from None


def _jsonl_rows(path: Path, kind: str | None, label: str, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    number = 0
    with open_binary(path, kind) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines, None)
            except _DAMAGED as exc:
                location = f"{prefix}line {number + 1}"
                raise MalformedInputError(label, location, None, f"damaged {kind} data ({exc})") from None
            if raw is None:
                return
            number += 1
            location = f"{prefix}line {number}"
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows tools start UTF-8 text with one
            line = _decode_line(raw, label, location)
            if not line.strip():
                continue
            row = _parse_json(line, label, location)
            if not isinstance(row, dict):
                raise MalformedInputError(label, location, None, f"expected a JSON object, got {type(row).__name__}")
            yield location, row


def _json_rows(path: Path, kind: str | None, label: str, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open_binary(path, kind) as handle:
            raw = handle.read()
    except _DAMAGED as exc:
        raise MalformedInputError(label, prefix.strip() or None, None, f"damaged {kind} data ({exc})") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows tools start UTF-8 text with one
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        problem = f"not UTF-8 text (byte {raw[exc.start]:#04x})"
        raise MalformedInputError(label, f"{prefix}line {line}", None, problem) from None
    data = _parse_json(text, label, None, prefix)
    if not isinstance(data, list):
        problem = "a .json file must hold a list of row objects (use .jsonl for one object per line)"
        raise MalformedInputError(label, prefix.strip() or None, None, problem)
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            problem = f"expected an object, got {type(row).__name__}"
            raise MalformedInputError(label, f"{prefix}row {number}", None, problem)
        yield f"{prefix}row {number}", row


def _parquet_rows(path: Path, label: str, prefix: str):
    try:
        # buffered column reads: a row group (the whole file, for many writers) is not decoded into memory at once
        handle = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MalformedInputError(label, prefix.strip() or None, None, f"not a readable Parquet file ({exc})") from None
    batches = handle.iter_batches(batch_size=TABLE_BATCH_ROWS, use_threads=False)
    return handle.schema_arrow.names, _batch_rows(batches, label, prefix)


def _csv_rows(path: Path, kind: str | None, label: str, prefix: str):
    """Every cell as text (bytes here, decoded per cell so a bad byte is named by row and field), except the score
    columns, which are numbers: type inference would read an answer "4" as an int."""
    where = prefix.strip() or None
    try:  # utf-8-sig: pyarrow drops a byte order mark, so the names must match without it
        with io.TextIOWrapper(open_binary(path, kind), encoding="utf-8-sig", errors="replace", newline="") as text:
            header = next(csv.reader(text), None)
    except _DAMAGED as exc:
        raise MalformedInputError(label, where, None, f"damaged {kind} data ({exc})") from None
    if not header:
        raise MalformedInputError(label, where, None, "the CSV file is empty (no header row)")
    handle = open_binary(path, kind)
    try:
        reader = pacsv.open_csv(
            handle,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.binary() for name in header}),
        )
    except (pa.ArrowInvalid, *_DAMAGED) as exc:
        handle.close()
        raise MalformedInputError(label, where, None, f"not a readable CSV file ({exc})") from None
    return reader.schema.names, _batch_rows(reader, label, prefix, csv_cells=True, close=handle)


def _batch_rows(
    batches: Iterable[pa.RecordBatch], label: str, prefix: str, csv_cells: bool = False, close: IO | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    number = 0
    try:
        batches = iter(batches)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowInvalid, *_DAMAGED) as exc:
                raise MalformedInputError(label, f"{prefix}after row {number}", None, f"unreadable ({exc})") from None
            if batch is None:
                return
            for start in range(0, batch.num_rows, TABLE_BATCH_ROWS):  # a CSV block's batch can hold millions
                for row in batch.slice(start, TABLE_BATCH_ROWS).to_pylist():
                    number += 1
                    location = f"{prefix}row {number}"
                    if csv_cells:
                        row = {k: _csv_cell(v, label, location, k) for k, v in row.items()}
                    yield location, row
    finally:
        if close is not None:
            close.close()


def _csv_cell(value: Any, label: str, location: str, field: str) -> Any:
    """One CSV cell as text, a score as a number; CSV cannot hold lists, so a cell that is a JSON list of messages
    (objects with a role and content) is decoded. Any other JSON stays text: it may be the answer itself."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {value[exc.start]:#04x} at position {exc.start + 1} of the cell)"
            raise MalformedInputError(label, location, field, problem) from None
    if field in SCORE_COLUMNS and isinstance(value, str):
        if not value.strip():
            return None
        try:
            return float(value)
        except ValueError:
            return value  # not a number: the format's score check names it
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        except RecursionError:
            raise MalformedInputError(label, location, field, "JSON nested too deeply to be a preference row") from None
        if all(isinstance(item, dict) and "role" in item and "content" in item for item in decoded):
            return decoded  # non-empty: it starts with "[{"
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
    table = _load_hf(source).with_format("arrow")[:]  # memory-mapped: batches are views of the cached files
    return table.column_names, _limited(_batch_rows(table.to_batches(TABLE_BATCH_ROWS), source.label, ""), source.limit)
