"""Content-addressed artifact store: ``artifacts/<stage>/<fingerprint>/`` with Parquet outputs and a manifest.

A stage writes into a private temporary folder and publishes it with one ``rename``, so readers only ever see
complete artifacts: a crash (even SIGKILL) leaves at most a ``.tmp-*`` folder that the next writer sweeps away.
The manifest is the last file written; its presence marks an artifact as complete.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

import creditflow
from creditflow.storage.hashing import git_commit, sha256_file, sha256_json

MANIFEST = "manifest.json"
# Locks are held for a rename or a catalog write; waiting longer than this means a stuck process.
LOCK_TIMEOUT_S = 600


class ArtifactError(RuntimeError):
    """An artifact is missing, incomplete or corrupted."""


def grant_umask_permissions(root: Path) -> None:
    """Give every file under ``root`` the read/write bits the umask allows: safetensors 0.8 writes its files 0600,
    which would hide a published model from the group that shares the workspace."""
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o666 & ~umask
    for path in root.rglob("*"):
        if path.is_file() and (mode := path.stat().st_mode & 0o777) & wanted != wanted:
            path.chmod(mode | wanted)


@dataclass
class Manifest:
    stage: str
    fingerprint: str
    digest: str  # content digest of the outputs; downstream fingerprints use this, not the fingerprint
    inputs: dict[str, Any]  # upstream artifact digests and source-data digests
    config: dict[str, Any]  # normalized stage config
    code_version: str
    outputs: dict[str, dict[str, Any]]  # relative file -> {sha256, bytes, rows?, volatile?}
    row_counts: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    created_at: str = ""
    git_commit: str | None = None
    creditflow_version: str = creditflow.__version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        return cls(**data)


class ArtifactWriter:
    """Collects a stage's outputs in a temporary folder; :meth:`ArtifactStore.publish` makes them visible."""

    def __init__(self, tmp_dir: Path):
        self.dir = tmp_dir
        self.row_counts: dict[str, int] = {}
        self.volatile: set[str] = set()  # outputs left out of the content digest (timings, memory readings)

    def write_table(self, name: str, table: pa.Table, volatile: bool = False) -> Path:
        """``volatile``: the table records how the run went (tokens/s, memory), not what it computed; it is
        checked like any output but does not enter the digest, so a byte-identical recompute keeps downstream
        cache hits."""
        path = self.dir / f"{name}.parquet"
        pq.write_table(table, path, compression="zstd")
        self.row_counts[name] = table.num_rows
        if volatile:
            self.volatile.add(path.name)
        return path

    def adopt_table(self, name: str) -> Path:
        """Register ``<name>.parquet``, written into :attr:`dir` by the stage itself (streamed in batches)."""
        path = self.dir / f"{name}.parquet"
        self.row_counts[name] = pq.ParquetFile(path).metadata.num_rows
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.dir / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        return path


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, stage: str, fingerprint: str) -> Path:
        return self.root / stage / fingerprint

    def lock(self, stage: str, fingerprint: str) -> FileLock:
        """The lock publishers and garbage collection hold while they rename an artifact's folder."""
        return FileLock(self.root / stage / f".{fingerprint}.lock", timeout=LOCK_TIMEOUT_S)

    def exists(self, stage: str, fingerprint: str) -> bool:
        return (self.path(stage, fingerprint) / MANIFEST).is_file()

    def load(self, stage: str, fingerprint: str) -> Manifest:
        path = self.path(stage, fingerprint) / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"no {stage} artifact with fingerprint {fingerprint} (looked for {path})")
        try:
            return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError) as exc:  # not UTF-8, not JSON, or not a manifest's fields
            raise ArtifactError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from exc

    def scan(self, stage: str | None = None) -> tuple[list[Manifest], list[str]]:
        """Every readable manifest (of ``stage``, or all), and why each unreadable one was skipped."""
        pattern = f"{stage}/*/{MANIFEST}" if stage else f"*/*/{MANIFEST}"
        manifests, skipped = [], []
        for path in sorted(self.root.glob(pattern)):
            try:
                manifests.append(self.load(path.parent.parent.name, path.parent.name))
            except ArtifactError as exc:
                skipped.append(str(exc))
        return manifests, skipped

    def manifests(self, stage: str | None = None) -> list[Manifest]:
        """Readable manifests only: a truncated or edited one is skipped (``scan`` says which and why)."""
        return self.scan(stage)[0]

    def find_by_digest(self, stage: str, digest: str) -> Manifest:
        for manifest in self.manifests(stage):
            if manifest.digest == digest:
                return manifest
        raise ArtifactError(f"no {stage} artifact with content digest {digest}")

    def file(self, manifest: Manifest, name: str, verify: bool = True) -> Path:
        """Path of one output file; with ``verify`` its bytes are checked against the manifest."""
        path = self.path(manifest.stage, manifest.fingerprint) / name
        expected = manifest.outputs.get(name)
        if expected is None:
            raise ArtifactError(f"{manifest.stage}/{manifest.fingerprint} has no output {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (the artifact was modified after it was written)")
        if verify and sha256_file(path) != expected["sha256"]:
            raise ArtifactError(f"{path}: content does not match its manifest digest (corrupted or edited)")
        return path

    def read_table(self, manifest: Manifest, name: str, verify: bool = True) -> pa.Table:
        return pq.read_table(self.file(manifest, f"{name}.parquet", verify=verify))

    def writer(self, stage: str, fingerprint: str) -> ArtifactWriter:
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f".tmp-{fingerprint}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return ArtifactWriter(tmp)

    def discard(self, writer: ArtifactWriter) -> None:
        shutil.rmtree(writer.dir, ignore_errors=True)

    def publish(
        self,
        writer: ArtifactWriter,
        *,
        stage: str,
        fingerprint: str,
        inputs: dict[str, Any],
        config: dict[str, Any],
        code_version: str,
        metrics: dict[str, float] | None = None,
        mlflow_run_id: str | None = None,
        replace: bool = False,
    ) -> Manifest:
        """Hash the outputs, write the manifest last and rename the folder into place.

        If another process published the same fingerprint first, its artifact wins and ours is discarded
        (same fingerprint means same inputs), unless ``replace`` asks for a forced recompute.
        """
        grant_umask_permissions(writer.dir)
        outputs = {}
        for path in sorted(writer.dir.rglob("*")):
            _fsync_path(path)  # on disk (a subfolder: its entries) before the manifest vouches for it
            if not path.is_file():
                continue
            rel = str(path.relative_to(writer.dir))
            outputs[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for name, rows in writer.row_counts.items():
            outputs[f"{name}.parquet"]["rows"] = rows
        for name in writer.volatile:
            outputs[name]["volatile"] = True
        manifest = Manifest(
            stage=stage,
            fingerprint=fingerprint,
            digest=sha256_json({k: v["sha256"] for k, v in outputs.items() if not v.get("volatile")}),
            inputs=inputs,
            config=config,
            code_version=code_version,
            outputs=outputs,
            row_counts=dict(writer.row_counts),
            metrics=dict(metrics or {}),
            mlflow_run_id=mlflow_run_id,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            git_commit=git_commit(),
        )
        tmp_manifest = writer.dir / f".{MANIFEST}.tmp"
        with open(tmp_manifest, "w") as handle:
            json.dump(manifest.to_dict(), handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp_manifest, writer.dir / MANIFEST)
        _fsync_path(writer.dir)

        final = self.path(stage, fingerprint)
        with self.lock(stage, fingerprint):
            if final.exists():
                if not replace and (final / MANIFEST).is_file():
                    self.discard(writer)
                    return self.load(stage, fingerprint)
                trash = final.with_name(f".trash-{fingerprint}-{uuid.uuid4().hex[:8]}")
                os.rename(final, trash)
                os.rename(writer.dir, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(writer.dir, final)
            _fsync_path(final.parent)  # the rename itself survives a crash
        return manifest

    def sweep_stale_tmp(self, stage: str) -> int:
        """Remove temporary folders left by writers that died (their pid is gone)."""
        removed = 0
        for tmp in (self.root / stage).glob(".tmp-*"):
            pid = int(tmp.name.split("-")[2]) if tmp.name.count("-") >= 3 else -1
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)
                removed += 1
        for trash in (self.root / stage).glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
        return removed


def _fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to disk. A folder is best effort: Windows cannot open one, and
    some file systems refuse to sync one."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not path.is_dir():
            raise


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
