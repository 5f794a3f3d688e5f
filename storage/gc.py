"""Artifact garbage collection: keep what the N most recent pipeline runs used, delete the other artifacts.

A run is a ``pipeline_run_id`` in the catalog's ``stage_runs`` (a stage run outside a pipeline is a run of its
own); its recency is its last stage's ``finished_at``. Kept are the artifacts those runs recorded plus, through
the manifests' upstream digests, the artifacts they were computed from. Everything else in the store goes,
except artifacts younger than ``min_age`` seconds (a running pipeline publishes an artifact a moment before it
records the run that uses it) and what a running stage holds a lease on (storage/leases.py): its upstream
artifacts, its checkpoints and, for a running token-reward stage, the token cache it is filling. Each deletion
holds the artifact's publish lock and first renames the folder to a ``.trash-*`` name, so readers never see a
half-deleted artifact and a writer of the same fingerprint waits.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from creditflow.storage.artifacts import Manifest
from creditflow.storage.catalog import Catalog
from creditflow.storage.leases import live_leases
from creditflow.storage.token_cache import TokenCache
from creditflow.storage.workspace import Workspace


@dataclass
class GcReport:
    kept_runs: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (stage, fingerprint)
    too_young: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # (stage, fingerprint, bytes)
    refused: str | None = None  # why nothing was considered for deletion
    live: list[tuple[str, str]] = field(default_factory=list)  # stages running now: their work is left alone
    removed_files: list[tuple[str, int]] = field(default_factory=list)  # checkpoints and cache shards: (path, bytes)

    @property
    def bytes_freed(self) -> int:
        return sum(size for _, _, size in self.removed) + sum(size for _, size in self.removed_files)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _kept_runs(catalog: Catalog, keep: int) -> tuple[list[str], set[tuple[str, str]]]:
    """The ``keep`` most recent runs and the (stage, fingerprint) pairs they recorded."""
    rows = catalog.recent_runs(keep)
    runs = list(dict.fromkeys(row[0] for row in rows))
    return runs, {(stage, fingerprint) for _, _, _, stage, fingerprint, _ in rows}


def _with_upstream(referenced: set[tuple[str, str]], manifests: list[Manifest]) -> set[tuple[str, str]]:
    """Add, transitively, every artifact whose content a referenced artifact was computed from."""
    by_key = {(m.stage, m.fingerprint): m for m in manifests}
    by_digest: dict[tuple[str, str], list[Manifest]] = {}
    for m in manifests:
        by_digest.setdefault((m.stage, m.digest), []).append(m)
    kept, todo = set(), list(referenced)
    while todo:
        key = todo.pop()
        if key in kept:
            continue
        kept.add(key)
        manifest = by_key.get(key)
        for stage, digest in (manifest.inputs.get("upstream", {}) if manifest else {}).items():
            todo.extend((u.stage, u.fingerprint) for u in by_digest.get((stage, digest), []))
    return kept


def _age_seconds(manifest: Manifest, now: dt.datetime) -> float:
    if not manifest.created_at:  # not written by ArtifactStore.publish; nothing says it is fresh
        return float("inf")
    return (now - dt.datetime.fromisoformat(manifest.created_at)).total_seconds()


def collect_garbage(workspace: Workspace, keep: int, dry_run: bool = False, min_age: float = 0.0) -> GcReport:
    """Delete the artifacts no recent run needs; ``dry_run`` only reports what would go."""
    if keep < 0:
        raise ValueError("keep must be >= 0")
    store = workspace.store
    catalog = Catalog(workspace.catalog_path, store)
    report = GcReport()
    report.kept_runs, referenced = _kept_runs(catalog, keep)
    if not catalog.recent_runs(1):
        # No history (a new workspace, or a catalog and run log both lost): nothing says what is still needed.
        report.refused = f"no run history in {catalog.run_log} or the catalog: nothing deleted"
        return report
    leases = live_leases(workspace.root)
    report.live = [(lease.stage, lease.fingerprint) for lease in leases]
    manifests = store.manifests()
    kept = _with_upstream(referenced | {key for lease in leases for key in lease.upstream}, manifests)
    now = dt.datetime.now(dt.timezone.utc)
    for manifest in manifests:
        key = (manifest.stage, manifest.fingerprint)
        if key in kept:
            report.kept.append(key)
            continue
        if _age_seconds(manifest, now) < min_age:
            report.too_young.append(key)
            continue
        folder = store.path(*key)
        # The stage's cached Prefect result points at this artifact; the stage would notice and recompute,
        # but the file is dead weight.
        result = workspace.prefect_results_dir / f"{manifest.stage}-{manifest.fingerprint}"
        size = _size(folder) + (result.stat().st_size if result.is_file() else 0)
        if not dry_run:
            with store.lock(manifest.stage, manifest.fingerprint):
                if not folder.exists():  # another gc got there first
                    continue
                trash = folder.with_name(f".trash-{manifest.fingerprint}-{uuid.uuid4().hex[:8]}")
                os.rename(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
            result.unlink(missing_ok=True)
        report.removed.append((*key, size))
    remaining = {(m.stage, m.fingerprint) for m in manifests} - {(s, f) for s, f, _ in report.removed}
    _prune_checkpoints(workspace, min_age, dry_run, report)
    if not any(stage == "token_rewards" for stage, _ in report.live):  # a running one's new shards are unreferenced
        _prune_token_cache(
            workspace, [m for m in manifests if (m.stage, m.fingerprint) in remaining], min_age, dry_run, report
        )
    if report.removed and not dry_run:
        catalog.refresh()
    return report


def _old_enough(path: Path, min_age: float) -> bool:
    return time.time() - path.stat().st_mtime >= min_age


def _remove(path: Path, dry_run: bool, report: GcReport) -> None:
    size = _size(path) if path.is_dir() else path.stat().st_size
    if not dry_run:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    report.removed_files.append((str(path), size))


def _prune_checkpoints(workspace: Workspace, min_age: float, dry_run: bool, report: GcReport) -> None:
    """Checkpoints left by runs that died (a finished stage removes its own; a running one holds a lease)."""
    root = workspace.root / "checkpoints"
    for folder in sorted(root.glob("*/*")) if root.is_dir() else []:
        if (folder.parent.name, folder.name) not in report.live and _old_enough(folder, min_age):
            _remove(folder, dry_run, report)


def _prune_token_cache(
    workspace: Workspace, kept: list[Manifest], min_age: float, dry_run: bool, report: GcReport
) -> None:
    """Shards with no row that a remaining token_rewards artifact was assembled from (whole shards only)."""

    cache = TokenCache.for_workspace(workspace)
    needed: set[str] = set()
    for manifest in (m for m in kept if m.stage == "token_rewards"):
        needed.update(workspace.store.read_table(manifest, "token_rewards").column("key").to_pylist())
    for shard, keys in cache.keys_by_shard().items():
        if needed.isdisjoint(keys) and _old_enough(shard, min_age):
            _remove(shard, dry_run, report)
