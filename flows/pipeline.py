"""Prefect flows: one flow per stage (each runnable alone) and the pipeline flow that chains them.

Flow parameters are plain JSON (the config as a dict) so the same flows serve the CLI, deployments and schedules.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from creditflow.flows.config import config_from_dict
from creditflow.flows.stages import STAGES, execute_stage
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace


def _run_one(
    name: str,
    config: dict[str, Any] | None,
    workspace: str | None,
    refresh: bool,
    mlflow_parent_run_id: str | None,
    progress: bool,
) -> dict[str, Any]:
    cfg = config_from_dict(config)
    ws = Workspace.resolve(workspace or cfg.workspace)
    return execute_stage(
        name, cfg, ws, refresh=refresh, parent_run_id=mlflow_parent_run_id, progress=progress
    ).to_dict()


@flow(name="curate", description=STAGES["curate"].description)
def curate_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    refresh: bool = False,
    mlflow_parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    return _run_one("curate", config, workspace, refresh, mlflow_parent_run_id, progress)


@flow(name="reward_model", description=STAGES["reward_model"].description)
def reward_model_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    refresh: bool = False,
    mlflow_parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    return _run_one("reward_model", config, workspace, refresh, mlflow_parent_run_id, progress)


@flow(name="onpolicy", description=STAGES["onpolicy"].description)
def onpolicy_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    refresh: bool = False,
    mlflow_parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    return _run_one("onpolicy", config, workspace, refresh, mlflow_parent_run_id, progress)


@flow(name="token_rewards", description=STAGES["token_rewards"].description)
def token_rewards_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    refresh: bool = False,
    mlflow_parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    return _run_one("token_rewards", config, workspace, refresh, mlflow_parent_run_id, progress)


@flow(name="policy", description=STAGES["policy"].description)
def policy_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    refresh: bool = False,
    mlflow_parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    return _run_one("policy", config, workspace, refresh, mlflow_parent_run_id, progress)


@flow(name="evaluate", description=STAGES["evaluate"].description)
def evaluate_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    refresh: bool = False,
    mlflow_parent_run_id: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    return _run_one("evaluate", config, workspace, refresh, mlflow_parent_run_id, progress)


STAGE_FLOWS = {
    "curate": curate_flow,
    "reward_model": reward_model_flow,
    "onpolicy": onpolicy_flow,
    "token_rewards": token_rewards_flow,
    "policy": policy_flow,
    "evaluate": evaluate_flow,
}


@flow(name="creditflow-pipeline", description="Curate -> reward model -> token rewards -> policy optimization.")
def pipeline_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage in order under one MLflow parent run.

    ``from_stage`` recomputes that stage and everything after it, taking earlier stages from the cache (they must
    exist). ``refresh`` names stages to recompute even if cached.
    """
    cfg = config_from_dict(config)
    ws = Workspace.resolve(workspace or cfg.workspace)
    order = [name for name, stage in STAGES.items() if stage.enabled(cfg)]
    refresh = list(refresh or [])
    unknown = [s for s in [*refresh, *([from_stage] if from_stage else [])] if s not in order]
    if unknown:
        raise ValueError(f"unknown or disabled stage {unknown[0]!r} (stages in this config: {', '.join(order)})")
    start = order.index(from_stage) if from_stage else 0

    started = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    parent = Run.start(
        ws,
        cfg.experiment,
        f"pipeline-{started}",
        tags={"creditflow.kind": "pipeline", "creditflow.from_stage": from_stage or ""},
    )
    results: dict[str, Any] = {}
    try:
        parent.log_params({"workspace": str(ws.root), "stages": ",".join(order)})
        for index, name in enumerate(order):
            if index < start:
                result = execute_stage(
                    name, cfg, ws, cached_only=True, parent_run_id=parent.run_id, progress=progress
                ).to_dict()
            else:
                result = STAGE_FLOWS[name](
                    config=config,
                    workspace=str(ws.root),
                    refresh=name in refresh or from_stage is not None,
                    mlflow_parent_run_id=parent.run_id,
                    progress=progress,
                )
            results[name] = result
            parent.set_tags(
                {
                    f"creditflow.fingerprint.{name}": result["manifest"]["fingerprint"],
                    f"creditflow.cache_hit.{name}": str(result["cache_hit"]).lower(),
                }
            )
        parent.log_metrics({"stages_cached": sum(r["cache_hit"] for r in results.values()), "stages_run": len(results)})
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    return {"mlflow_run_id": parent.run_id, "workspace": str(ws.root), "stages": results}
