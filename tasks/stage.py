"""What a stage's compute function receives. Stages know nothing about Prefect; flows/stages.py wires them in."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from creditflow.storage.artifacts import ArtifactWriter, Manifest
from creditflow.storage.shard_results import ShardResults, remove_shards
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)  # eleven fields: a call names each one
class StageContext:
    config: Any  # the stage's config section (a pydantic model from tasks/configs.py)
    workspace: Workspace
    upstream: dict[str, Manifest]  # upstream stage name -> its manifest, verified on read
    writer: ArtifactWriter  # outputs go here; they become visible only when the stage succeeds
    run: Run  # this stage's MLflow child run
    progress: bool = True
    stage: str = ""
    fingerprint: str = ""
    reference_model: str | None = None  # the pipeline's reference_model, for the stages that declare they use it
    compute: Any = None  # the pipeline's ComputeConfig: where inference runs (local or Ray)
    trust_remote_code: bool = False  # the pipeline's trust_remote_code: read it through remote_code_allowed()

    def remote_code_allowed(self, *folders) -> bool:
        """The pipeline's ``trust_remote_code``, for the stage to pass to every load of the models in ``folders``.
        When on, the stage warns once naming them and tags its MLflow run: code shipped with them may run here."""
        if self.trust_remote_code:
            logger.warning(
                "%s: trust_remote_code is on: transformers may run the Python files shipped in %s",
                self.stage,
                ", ".join(map(str, folders)),
            )
            self.run.set_tags({"creditflow.trust_remote_code": "true"})
        return self.trust_remote_code

    @property
    def checkpoint_dir(self):
        """Where a long-running stage keeps resumable checkpoints for this exact fingerprint."""
        return self.workspace.root / "checkpoints" / self.stage / self.fingerprint

    def shard_results(self, job: str) -> ShardResults:
        """Finished shards of an inference job of this run (kept across a crash, for the rerun to reuse)."""
        return ShardResults(self.checkpoint_dir / "shards", job)

    def drop_shard_results(self) -> None:
        """Call once the outputs are written: the published artifact supersedes the finished shards."""
        remove_shards(self.checkpoint_dir / "shards")

    def log_model_location(self, folder: str) -> None:
        """Point the MLflow run at the trained model instead of copying its weights into ``mlruns/``: the artifact
        store holds the one copy (which ``creditflow artifacts gc`` manages)."""
        location = self.workspace.store.path(self.stage, self.fingerprint) / folder
        self.run.log_dict(
            {"path": str(location), "stage": self.stage, "fingerprint": self.fingerprint}, f"{self.stage}/model.json"
        )
        self.run.set_tags({"creditflow.model_path": str(location)})

    def read_upstream(self, stage: str, table: str) -> pa.Table:
        return self.workspace.store.read_table(self.upstream[stage], table)

    def upstream_dir(self, stage: str):
        """Folder of an upstream artifact, for outputs that are not tables (model checkpoints)."""
        manifest = self.upstream[stage]
        return self.workspace.store.path(manifest.stage, manifest.fingerprint)

    def reward_model_folder(self) -> Path:
        """The reward model the reward-model stage published (:func:`reward_model_location`)."""
        if "reward_model" not in self.upstream:
            raise ValueError(f"{self.stage}: needs the reward_model stage upstream")
        return reward_model_location(self.workspace.store, self.upstream["reward_model"])


PRETRAINED_RECORD = "pretrained.json"  # the reward-model artifact of reward_model.pretrained: where the model is


def reward_model_location(store, manifest: Manifest) -> Path:
    """The reward model of a reward-model artifact: its trained ``model/``, or the pretrained model it evaluated
    (``reward_model.pretrained``: the artifact records the resolved snapshot's folder, whose digest is in its
    fingerprint)."""
    if PRETRAINED_RECORD not in manifest.outputs:
        return store.path(manifest.stage, manifest.fingerprint) / "model"
    record = json.loads(store.file(manifest, PRETRAINED_RECORD).read_text())
    folder = Path(record["folder"])
    if not folder.is_dir():
        raise ValueError(
            f"reward_model artifact {manifest.fingerprint}: the pretrained reward model {record['pretrained']!r} is "
            f"no longer at {folder}; rerun the reward_model stage"
        )
    return folder
