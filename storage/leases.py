"""Leases: what a running stage holds so that ``artifacts gc`` leaves its work alone.

A stage computing holds an OS file lock (``flock``) on a file of its own under ``<workspace>/leases/``, next to a
JSON note of its stage, fingerprint and upstream artifacts. The kernel drops the lock when the process ends, however
it ends (SIGKILL included), so a lease never outlives its holder and gc can tell a live run's checkpoints, cache
shards and inputs from a dead run's leftovers without trusting clocks or file ages.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

LEASES = "leases"
_LEFTOVER_S = 60.0


@dataclasses.dataclass(frozen=True)
class Lease:
    stage: str
    fingerprint: str
    upstream: tuple[tuple[str, str], ...]  # (stage, fingerprint) of every artifact the stage reads


@contextmanager
def hold_lease(root: Path, lease: Lease) -> Iterator[None]:
    """Hold ``lease`` in workspace ``root`` while the block runs."""
    folder = Path(root) / LEASES
    folder.mkdir(parents=True, exist_ok=True)
    name = folder / f"{lease.stage}.{lease.fingerprint}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    note, lock_path = name.with_suffix(".json"), name.with_suffix(".lock")
    with FileLock(lock_path):
        note.write_text(json.dumps(dataclasses.asdict(lease)))
        try:
            yield
        finally:
            note.unlink(missing_ok=True)
    lock_path.unlink(missing_ok=True)


def live_leases(root: Path) -> list[Lease]:
    """The leases held now; a dead run's leftover files (a lock nobody holds, a minute old) are removed. A holder
    locks its file before it writes the note, so a held lock whose note is not readable yet is skipped."""
    live = []
    for lock_path in sorted((Path(root) / LEASES).glob("*.lock")):
        note = lock_path.with_suffix(".json")
        probe = FileLock(lock_path, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            try:
                held = json.loads(note.read_text())
            except (OSError, ValueError):
                continue
            upstream = tuple((stage, fingerprint) for stage, fingerprint in held["upstream"])
            live.append(Lease(held["stage"], held["fingerprint"], upstream))
            continue
        try:  # unheld; a file this old is no holder between its open and its lock (each holder makes its own)
            if time.time() - lock_path.stat().st_mtime > _LEFTOVER_S:
                note.unlink(missing_ok=True)
                lock_path.unlink(missing_ok=True)
        finally:
            probe.release()
    return live
