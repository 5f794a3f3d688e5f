"""Finished shards of a stage run still in progress (on-policy samples, evaluation answers, reward-model scores).

One JSON file per shard, ``<stage checkpoint folder>/shards/<name>-<index>.json``, written atomically (temporary
file, then rename) as soon as the shard is done, locally or on a Ray worker. The folder belongs to one stage
fingerprint, so a rerun after a crash or a killed worker sees the same shards: it reads the finished ones back and
computes only the rest. Each file also records the digest of its shard's inputs, and a file whose digest does not
match (or that does not parse) is recomputed, never trusted. The stage removes the folder once its artifact is
published. JSON, never pickle: nothing read from the workspace can run code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from creditflow.storage.hashing import sha256_json

logger = logging.getLogger(__name__)


class ShardResults:
    """The finished shards of one named job (``samples-reference``, ``rm-policy``, ...) of one stage run."""

    def __init__(self, root: str | Path, name: str):
        self.root, self.name = Path(root), name

    def _path(self, index: int) -> Path:
        return self.root / f"{self.name}-{index:05d}.json"

    def read(self, index: int, inputs: Any) -> list | None:
        """The rows of shard ``index`` if it finished for exactly these ``inputs``, else None."""
        path = self._path(index)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["inputs"] == sha256_json(inputs):
                return saved["rows"]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable finished shard (%s); computing it again", path, exc)
        return None

    def write(self, index: int, inputs: Any, rows: list) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(index)
        # Two runs of one fingerprint may finish the same shard at once: each writes its own file, the last rename wins.
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump({"inputs": sha256_json(inputs), "rows": rows}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)


def remove_shards(root: str | Path) -> None:
    """Drop a stage run's finished shards: the published artifact supersedes them."""
    shutil.rmtree(root, ignore_errors=True)
