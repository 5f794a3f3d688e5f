"""DuckDB catalog over the artifact store.

Views ``<stage>_<table>`` union every artifact's ``<table>.parquet`` across runs, each row tagged with the
artifact's ``fingerprint``. Tables ``artifacts`` (one row per manifest) and ``stage_runs`` (one row per stage
execution, cache hits included) describe the runs.

The catalog is derived data. Run history is kept durably beside it in ``stage_runs.jsonl``, an append-only log
that ``refresh`` rebuilds ``stage_runs`` from. So a deleted or garbage catalog file is rebuilt with its history by
``creditflow catalog refresh``; a garbage file is moved aside, and unreadable manifests are named and skipped.

User queries (:meth:`Catalog.query_user`) run on a read-only connection, as single SELECT statements, with file
access limited to the artifact store: they cannot write files or read outside it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from creditflow.storage.artifacts import LOCK_TIMEOUT_S, ArtifactStore, Manifest

_IDENT = re.compile(r"[^a-z0-9_]+")
RUN_COLUMNS = (
    "pipeline_run_id",
    "mlflow_run_id",
    "stage",
    "fingerprint",
    "digest",
    "cache_hit",
    "row_counts",
    "finished_at",
)
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
# SELECT only: EXPLAIN ANALYZE runs the statement it explains, and a COPY TO inside the store would be allowed.
_ALLOWED_STATEMENTS = (duckdb.StatementType.SELECT,)


class CatalogError(RuntimeError):
    """The catalog cannot answer: a bad query, or a file that is not a DuckDB database."""


@dataclass
class RefreshReport:
    views: list[str]
    skipped: list[str] = field(default_factory=list)  # manifests, output files and run-log lines not read, with why
    moved_aside: Path | None = None  # a catalog file that was not a DuckDB database


def _is_lock_error(exc: duckdb.IOException) -> bool:
    """DuckDB reports a file held by another process and a file that is not a database as the same exception."""
    return "lock" in str(exc).lower()


def _view_name(stage: str, table: str) -> str:
    return _IDENT.sub("_", f"{stage}_{table}".lower())


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Catalog:
    def __init__(self, path: str | Path, store: ArtifactStore):
        self.path = Path(path)
        self.store = store
        self.run_log = self.path.with_name("stage_runs.jsonl")

    def _lock(self) -> FileLock:
        return FileLock(self.path.with_suffix(".lock"), timeout=LOCK_TIMEOUT_S)

    def _connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        # DuckDB allows one writing process per file; other processes wait on our lock instead of failing.
        last_error: Exception | None = None
        for attempt in range(50):
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):  # not a DuckDB file at all: retrying will not help
                    raise CatalogError(
                        f"{self.path}: not a readable DuckDB catalog ({exc}); `creditflow catalog refresh` rebuilds it"
                    ) from None
                last_error = exc  # held by a process outside our lock (e.g. a user's duckdb shell)
                time.sleep(min(0.1 * (attempt + 1), 1.0))
        raise CatalogError(f"{self.path}: catalog is locked by another process ({last_error})")

    # -- building ------------------------------------------------------------------------------------------

    def refresh(self) -> RefreshReport:
        """Recreate ``artifacts``, ``stage_runs`` (from the run log) and one view per (stage, output table)."""
        manifests, skipped = self.store.scan()
        tables: dict[tuple[str, str], list[str]] = {}
        for manifest in manifests:
            for rel in manifest.outputs:
                if rel.endswith(".parquet") and "/" not in rel:
                    path = self.store.path(manifest.stage, manifest.fingerprint) / rel
                    try:  # one cut-short file must not take every view (and every later refresh) down with it
                        pq.read_metadata(path)
                    except (OSError, pa.ArrowException) as exc:
                        skipped.append(f"{path}: not a readable Parquet file ({exc}); left out of its view")
                        continue
                    tables.setdefault((manifest.stage, rel[: -len(".parquet")]), []).append(manifest.fingerprint)
        with self._lock():
            moved = self._move_aside_if_garbage()
            con = self._connect()
            try:
                con.execute(STAGE_RUNS_DDL)
                skipped += self._load_run_log(con)
                self._write_artifacts(con, manifests)
                views = self._write_views(con, tables)
            finally:
                con.close()
        return RefreshReport(views, skipped, moved)

    def _move_aside_if_garbage(self) -> Path | None:
        if not self.path.exists():
            return None
        try:
            duckdb.connect(str(self.path), read_only=True).close()
        except duckdb.IOException as exc:
            if _is_lock_error(exc):
                return None
            aside = self.path.with_name(f"{self.path.name}.corrupt-{dt.datetime.now():%Y%m%d-%H%M%S}")
            self.path.rename(aside)
            return aside
        return None

    def _load_run_log(self, con) -> list[str]:
        """``stage_runs`` is the log's content (a workspace from before the log keeps its table as it is); returns
        the lines it could not read (a line cut short by a crash mid-append, an edited one), with why."""
        if not self.run_log.is_file():
            return []
        rows, skipped = [], []
        for number, line in enumerate(self.run_log.read_bytes().splitlines(), start=1):
            try:
                entry = json.loads(line.decode("utf-8"))
                rows.append(tuple(entry[c] if c != "row_counts" else json.dumps(entry[c]) for c in RUN_COLUMNS))
            except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError included
                skipped.append(f"{self.run_log}: line {number}: not a run record ({type(exc).__name__}); skipped")
        con.execute("DELETE FROM stage_runs")
        if rows:
            con.executemany(f"INSERT INTO stage_runs VALUES ({', '.join('?' * len(RUN_COLUMNS))})", rows)
        return skipped

    def _write_artifacts(self, con, manifests: list[Manifest]) -> None:
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

    def _write_views(self, con, tables: dict[tuple[str, str], list[str]]) -> list[str]:
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
        """Append to the durable run log, then to the catalog's ``stage_runs``."""
        finished_at = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        values = (pipeline_run_id, mlflow_run_id, stage, fingerprint, digest, cache_hit, row_counts, finished_at)
        entry = dict(zip(RUN_COLUMNS, values))
        with self._lock():
            with open(self.run_log, "a") as log:
                log.write(json.dumps({**entry, "finished_at": finished_at.isoformat()}) + "\n")
            con = self._connect()
            try:
                con.execute(STAGE_RUNS_DDL)
                con.execute(
                    f"INSERT INTO stage_runs VALUES ({', '.join('?' * len(RUN_COLUMNS))})",
                    [*values[:6], json.dumps(row_counts), finished_at],
                )
            finally:
                con.close()

    # -- reading -------------------------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None, settings: tuple[str, ...] = ()) -> tuple[list, list]:
        """Run read-only SQL, after the connection ``settings`` statements; returns (column names, rows)."""
        if not self.path.exists():
            self.refresh()
        with self._lock():
            con = self._connect(read_only=True)
            try:
                for statement in settings:
                    con.execute(statement)
                result = con.execute(sql, params or [])
                columns = [d[0] for d in result.description] if result.description else []
                return columns, result.fetchall()
            finally:
                con.close()

    def query_user(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A user's query (``creditflow sql``): one SELECT, read-only, files readable only inside the store."""
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise CatalogError(str(exc)) from None
        if len(statements) != 1 or statements[0].type not in _ALLOWED_STATEMENTS:
            kinds = ", ".join(s.type.name for s in statements) or "nothing"
            raise CatalogError(f"creditflow sql runs one SELECT statement (got {kinds}); the catalog is read-only")
        settings = (
            f"SET allowed_directories = [{_sql_str(str(self.store.root.resolve()))}]",
            "SET enable_external_access = false",
            "SET lock_configuration = true",
        )
        try:
            return self.query(sql, settings=settings)
        except duckdb.Error as exc:
            raise CatalogError(str(exc).splitlines()[0]) from None

    def stage_fingerprints(self, stage: str, run_id: str | None = None) -> list[str]:
        """Fingerprints ``stage`` ran (or hit) with, newest first; with ``run_id`` (a pipeline or MLflow run id, or
        a unique prefix of one) only that run's."""
        where, params = "stage = ?", [stage]
        if run_id:
            where += " AND (starts_with(pipeline_run_id, ?) OR starts_with(mlflow_run_id, ?))"
            params += [run_id, run_id]
        _, rows = self.query(
            f"SELECT fingerprint, max(finished_at) AS last FROM stage_runs WHERE {where} GROUP BY 1 ORDER BY 2 DESC",
            params,
        )
        return [fingerprint for fingerprint, _ in rows]

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
