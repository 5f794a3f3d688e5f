"""DuckDB catalog over the artifact store.

Views ``<stage>_<table>`` union every artifact's ``<table>.parquet`` across runs, each row tagged with the
artifact's ``fingerprint``. Tables ``artifacts`` (one row per manifest) and ``stage_runs`` (one row per stage
execution, cache hits included) describe the runs. The catalog is derived data: ``refresh`` rebuilds it from
the manifests on disk, so it can always be recreated with ``creditflow catalog refresh``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock

from creditflow.storage.artifacts import LOCK_TIMEOUT_S, ArtifactStore

_IDENT = re.compile(r"[^a-z0-9_]+")

STAGE_RUNS_DDL = """
CREATE TABLE IF NOT EXISTS stage_runs (
    pipeline_run_id VARCHAR,
    mlflow_run_id VARCHAR,
    stage VARCHAR,
    fingerprint VARCHAR,
    digest VARCHAR,
    cache_hit BOOLEAN,
    row_counts JSON,
    finished_at TIMESTAMP
)
"""


def _view_name(stage: str, table: str) -> str:
    return _IDENT.sub("_", f"{stage}_{table}".lower())


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Catalog:
    def __init__(self, path: str | Path, store: ArtifactStore):
        self.path = Path(path)
        self.store = store

    def _connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        # DuckDB allows one writing process per file; other processes wait on our lock instead of failing.
        last_error: Exception | None = None
        for attempt in range(50):
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:  # held by a process outside our lock (e.g. a user's duckdb shell)
                last_error = exc
                time.sleep(min(0.1 * (attempt + 1), 1.0))
        raise RuntimeError(f"{self.path}: catalog is locked by another process ({last_error})")

    def refresh(self) -> list[str]:
        """Recreate the ``artifacts`` table and one view per (stage, output table); returns the view names."""
        manifests = self.store.manifests()
        tables: dict[tuple[str, str], list[str]] = {}
        for manifest in manifests:
            for rel in manifest.outputs:
                if rel.endswith(".parquet") and "/" not in rel:
                    tables.setdefault((manifest.stage, rel[: -len(".parquet")]), []).append(manifest.fingerprint)
        with FileLock(self.path.with_suffix(".lock"), timeout=LOCK_TIMEOUT_S):
            con = self._connect()
            try:
                con.execute(STAGE_RUNS_DDL)
                con.execute(
                    "CREATE OR REPLACE TABLE artifacts (stage VARCHAR, fingerprint VARCHAR, digest VARCHAR, "
                    "created_at TIMESTAMP, row_counts JSON, mlflow_run_id VARCHAR, code_version VARCHAR, path VARCHAR)"
                )
                if manifests:
                    con.executemany(
                        "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                m.stage,
                                m.fingerprint,
                                m.digest,
                                m.created_at,
                                json.dumps(m.row_counts),
                                m.mlflow_run_id,
                                m.code_version,
                                str(self.store.path(m.stage, m.fingerprint)),
                            )
                            for m in manifests
                        ],
                    )
                existing = {
                    row[0]
                    for row in con.execute(
                        "SELECT view_name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'"
                    ).fetchall()
                }
                views = []
                for (stage, table), fingerprints in sorted(tables.items()):
                    name = _view_name(stage, table)
                    files = [str(self.store.path(stage, fp) / f"{table}.parquet") for fp in sorted(fingerprints)]
                    file_list = "[" + ", ".join(_sql_str(f) for f in files) + "]"
                    con.execute(
                        f"CREATE OR REPLACE VIEW {name} AS SELECT * EXCLUDE (filename), "
                        f"regexp_extract(filename, '/([0-9a-f]+)/[^/]+$', 1) AS fingerprint "
                        f"FROM read_parquet({file_list}, union_by_name = true, filename = true)"
                    )
                    views.append(name)
                for stale in existing - set(views):
                    con.execute(f"DROP VIEW IF EXISTS {stale}")
                return views
            finally:
                con.close()

    def record_stage_run(
        self,
        *,
        pipeline_run_id: str | None,
        mlflow_run_id: str | None,
        stage: str,
        fingerprint: str,
        digest: str,
        cache_hit: bool,
        row_counts: dict[str, int],
    ) -> None:
        with FileLock(self.path.with_suffix(".lock"), timeout=LOCK_TIMEOUT_S):
            con = self._connect()
            try:
                con.execute(STAGE_RUNS_DDL)
                con.execute(
                    "INSERT INTO stage_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        pipeline_run_id,
                        mlflow_run_id,
                        stage,
                        fingerprint,
                        digest,
                        cache_hit,
                        json.dumps(row_counts),
                        dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
                    ],
                )
            finally:
                con.close()

    def query(self, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run read-only SQL; returns (column names, rows)."""
        if not self.path.exists():
            self.refresh()
        with FileLock(self.path.with_suffix(".lock"), timeout=LOCK_TIMEOUT_S):
            con = self._connect(read_only=True)
            try:
                result = con.execute(sql, params or [])
                columns = [d[0] for d in result.description] if result.description else []
                return columns, result.fetchall()
            finally:
                con.close()

    def recent_runs(self, limit: int) -> list[tuple]:
        """Stage runs of the ``limit`` most recent runs, newest run first, each run's stages in order:
        (run_id, finished_at, in_pipeline, stage, fingerprint, cache_hit). A stage run outside a pipeline is a run of
        its own."""
        _, rows = self.query(
            """
            WITH recent AS (
                SELECT coalesce(pipeline_run_id, mlflow_run_id) AS run_id, max(finished_at) AS finished_at
                FROM stage_runs GROUP BY 1 ORDER BY 2 DESC LIMIT ?
            )
            SELECT r.run_id, r.finished_at, s.pipeline_run_id IS NOT NULL, s.stage, s.fingerprint, s.cache_hit
            FROM recent r JOIN stage_runs s ON coalesce(s.pipeline_run_id, s.mlflow_run_id) = r.run_id
            ORDER BY r.finished_at DESC, s.finished_at
            """,
            [limit],
        )
        return rows
