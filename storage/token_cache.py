"""The token-reward shard cache: ``<workspace>/cache/token_rewards/shard-<uuid>.parquet``, shared by every config
and run, looked up by content key.

A row's key is ``sha256(source, prompt messages, completion messages, knobs)``, where the knobs are everything
else that changes its values (tasks/recipes/token_rewards.py lists them per source). Shards are append-only and written
atomically (temporary file, then rename) as soon as their rows are done, so a run that dies keeps every shard it
finished and the next run computes only the keys that are still missing.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from creditflow.storage.hashing import sha256_json

CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("n_tokens", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
        ("char_start", pa.list_(pa.int32())),
        ("char_end", pa.list_(pa.int32())),
        ("rewards", pa.list_(pa.float32())),
        ("ref_logps", pa.list_(pa.float32())),
    ]
)
_STALE_TMP_SECONDS = 3600  # a shard takes seconds to write; older temporary files belong to dead runs


class TokenCacheError(RuntimeError):
    """A cache shard is missing or unreadable."""


def row_key(source: str, knobs: dict[str, Any], prompt: list[dict], completion: list[dict]) -> str:
    """Content key of one cache row. Messages are hashed verbatim: whitespace changes token ids."""
    messages = [[(m["role"], m["content"]) for m in turns] for turns in (prompt, completion)]
    return sha256_json({"source": source, "knobs": knobs, "messages": messages})


class TokenCache:
    """Append-only Parquet shards of cache rows, looked up by key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for tmp in self.root.glob(".tmp-*"):
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink(missing_ok=True)

    @classmethod
    def for_workspace(cls, workspace) -> "TokenCache":
        return cls(workspace.root / "cache" / "token_rewards")

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.parquet"))

    def keys_by_shard(self) -> dict[Path, set[str]]:
        return {shard: set(_read_shard(shard, columns=["key"]).column("key").to_pylist()) for shard in self.shards()}

    def index(self) -> dict[str, Path]:
        """key -> the shard holding it (the first one, if a key was computed twice by concurrent runs)."""
        index: dict[str, Path] = {}
        for shard, keys in self.keys_by_shard().items():
            for key in keys:
                index.setdefault(key, shard)
        return index

    def missing_keys(self, keys: list[str], index: dict[str, Path] | None = None) -> list[str]:
        """The distinct ``keys`` not in the cache, in first-seen order."""
        index = self.index() if index is None else index
        return [k for k in dict.fromkeys(keys) if k not in index]

    def write_shard(self, rows: list[dict[str, Any]]) -> Path:
        """Write rows as one new shard, atomically: a reader sees the whole shard or none of it."""
        name = f"shard-{uuid.uuid4().hex}.parquet"
        tmp = self.root / f".tmp-{name}"
        pq.write_table(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), tmp, compression="zstd")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.rename(tmp, self.root / name)
        return self.root / name

    def read_rows(self, keys: list[str], index: dict[str, Path] | None = None) -> pa.Table:
        """Cache rows for ``keys``, in that order (repeats allowed). Every key must be cached."""
        if not keys:
            return CACHE_SCHEMA.empty_table()
        index = self.index() if index is None else index
        absent = [k for k in keys if k not in index]
        if absent:
            raise KeyError(f"{len(absent)} keys are not in the token-reward cache {self.root}, e.g. {absent[0]}")
        wanted_by_shard: dict[Path, set[str]] = {}
        for key in keys:
            wanted_by_shard.setdefault(index[key], set()).add(key)
        parts = []
        for shard, wanted in wanted_by_shard.items():
            table = _read_shard(shard)
            # A shard holds each key once (it is written from distinct missing keys).
            parts.append(table.filter(pc.is_in(table.column("key"), pa.array(sorted(wanted)))))
        table = pa.concat_tables(parts)
        position = {key: i for i, key in enumerate(table.column("key").to_pylist())}
        return table.take([position[k] for k in keys])


def _read_shard(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise TokenCacheError(f"{path}: token-reward cache shard is missing (deleted while in use?); rerun the stage")
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise TokenCacheError(
            f"{path}: corrupted token-reward cache shard ({exc}); delete it to recompute its rows"
        ) from exc
    expected = CACHE_SCHEMA if columns is None else pa.schema([CACHE_SCHEMA.field(c) for c in columns])
    if not table.schema.equals(expected):
        raise TokenCacheError(f"{path}: not a token-reward cache shard (schema {table.schema})")
    return table
