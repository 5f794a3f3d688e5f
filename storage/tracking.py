"""MLflow helpers: experiment setup and an explicit run handle (no global "active run" state)."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from creditflow.storage.artifacts import LOCK_TIMEOUT_S
from creditflow.storage.names import check_name
from creditflow.storage.workspace import Workspace

_BATCH = 100
_PARAM_MAX = 6000


_SQLITE_READY: set[str] = set()


def client_for(workspace: Workspace) -> MlflowClient:
    uri = workspace.mlflow_tracking_uri
    if uri.startswith("sqlite:") and uri not in _SQLITE_READY:
        # The first client in a process creates and migrates the SQLite store (then MLflow caches it); two
        # processes doing that at once on a fresh workspace collide ("table ... already exists"): serialize it.
        with FileLock(workspace.root / "mlflow.lock", timeout=LOCK_TIMEOUT_S):
            client = MlflowClient(tracking_uri=uri)
        _SQLITE_READY.add(uri)
        return client
    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment in the view its kind names; untagged ones may land on the GenAI traces overview,
# where training runs do not show. The description is the experiment page's note.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "CreditFlow: one parent run per pipeline run (its headline metrics: reward-model accuracy, policy loss and "
        "token-reward correlation, evaluation win rates), with a child run per stage: curate, reward_model, "
        "onpolicy, token_rewards, policy, rl, evaluate, audit. Each child run logs its stage's metrics, figures and "
        "the artifact it wrote (creditflow.fingerprint)."
    ),
}


def ensure_experiment(workspace: Workspace, name: str) -> str:
    check_name(name, "experiment")  # every caller, not only configs: the name becomes a folder under mlruns/
    client = client_for(workspace)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # A local SQLite store would otherwise put artifacts in ./mlruns of whatever directory we run from.
    location = None
    if workspace.mlflow_tracking_uri.startswith("sqlite:"):
        location = (workspace.mlflow_artifacts_dir / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    except Exception:  # another process created it between our lookup and create
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# MLflow 3's saved views of an experiment's runs table live in experiment tags under this prefix (the UI's "Views"
# menu); a link opens one with ?viewStateShareKey=<id>. The state's selectedColumns are the table's columns.
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."


def save_runs_view(workspace: Workspace, experiment: str, view_id: str, name: str, params, metrics) -> None:
    """A saved view of ``experiment``'s runs table whose columns are ``params`` and ``metrics`` (MLflow hides metric
    columns until someone picks them). Written once; rewritten only when its columns change."""
    client = client_for(workspace)
    experiment_id = ensure_experiment(workspace, experiment)
    columns = [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in metrics]
    state = json.dumps({"selectedColumns": columns})
    key = SAVED_VIEW_PREFIX + view_id
    current = client.get_experiment(experiment_id).tags.get(key)
    if current is not None and json.loads(current).get("state") == state:
        return
    now = int(time.time() * 1000)
    client.set_experiment_tag(
        experiment_id, key, json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": state})
    )


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> ``{"rules.max_length": "512"}`` for MLflow params."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return {prefix: text[:_PARAM_MAX]}


class Run:
    """One MLflow run, addressed by id; safe to use from any thread or Prefect task."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(
        cls,
        workspace: Workspace,
        experiment: str,
        name: str,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> "Run":
        client = client_for(workspace)
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(ensure_experiment(workspace, experiment), tags=all_tags, run_name=name)
        return cls(client, run.info.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten("", dict(params)).items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_rows(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """A table shown by the MLflow UI's artifact viewer (JSON split format)."""
        import pandas as pd

        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
