"""The workspace: one folder holding artifacts, the DuckDB catalog, MLflow's SQLite store and Prefect results."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from creditflow.storage.artifacts import ArtifactStore

DEFAULT_WORKSPACE = "creditflow-workspace"
WORKSPACE_ENV = "CREDITFLOW_WORKSPACE"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> "Workspace":
        """Explicit path, else ``$CREDITFLOW_WORKSPACE``, else ``./creditflow-workspace``."""
        chosen = path or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        workspace = cls(Path(chosen).expanduser().resolve())
        if workspace.root.exists() and not workspace.root.is_dir():
            raise NotADirectoryError(f"workspace {workspace.root} is a file; -w (or ${WORKSPACE_ENV}) names a folder")
        for folder in (workspace.artifacts_dir, workspace.mlflow_artifacts_dir, workspace.prefect_results_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return workspace

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.root / "mlruns"

    @property
    def prefect_results_dir(self) -> Path:
        return self.root / "prefect-results"

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifacts_dir)

    @property
    def mlflow_tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` selects a remote server; otherwise MLflow on SQLite inside the workspace."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"
