"""Prefect flows: one flow per stage (each runnable alone) and the pipeline flow that chains them.

Flow parameters are plain JSON (the config as a dict) so the same flows serve the CLI, deployments and schedules.
The pipeline plans each stage once, from the manifests of the stages it just ran, and refreshes the DuckDB catalog
once at the end.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from creditflow.flows.config import (
    ConfigError,
    PipelineConfig,
    data_needs,
    default_run_name,
    pipeline_needs,
    validate,
)
from creditflow.flows.registry import STAGES, pin_hub_revisions
from creditflow.flows.stages import StageNotReady, execute_stage, hash_sources, plan_stage, record_stage_run
from creditflow.storage.artifacts import Manifest
from creditflow.storage.catalog import Catalog
from creditflow.storage.tracking import Run, save_runs_view
from creditflow.storage.workspace import Workspace

# Shown on the parent run, so runs compare in MLflow's list without opening their children.
HEADLINE_METRICS = {
    "curate": ("pairs_out", "quarantined"),
    "reward_model": ("eval.accuracy",),
    "policy": ("final_loss", "final_rewards_accuracy", "final_token_reward_corr"),
    "rl": ("final_reward", "final_gold", "final_kl"),
    "evaluate": (
        "win_rate_rm",
        "lc_win_rate_rm",
        "win_rate_gold",
        "lc_win_rate_gold",
        "win_rate_judge",
        "lc_win_rate_judge",
        "gold_score.policy",
        "rm_score.policy",
        "gold_score.rl",
    ),
}


def headline_params(cfg) -> dict[str, Any]:
    policy = cfg.policy
    return {
        "reference_model": cfg.reference_model,
        "loss_type": policy.loss.loss_type,
        "beta": policy.loss.beta,
        "alpha": policy.loss.alpha,
        "token_reward_source": policy.token_reward_source,
        "lora": f"r={policy.lora.r}" if policy.lora else "none",
        "seed": policy.seed,
        "onpolicy": cfg.onpolicy.enabled,
        "rl": f"{cfg.rl.algorithm} ({cfg.rl.reward_source})" if cfg.rl.enabled else "none",
    }


# The columns of the experiment's saved runs view (storage/tracking.save_runs_view), which the printed link opens.
HEADLINE_VIEW = "creditflow-headline"
HEADLINE_COLUMNS = (
    ("loss_type", "alpha", "token_reward_source", "seed"),
    (
        "reward_model.eval.accuracy",
        "policy.final_loss",
        "policy.final_token_reward_corr",
        "evaluate.win_rate_rm",
        "evaluate.lc_win_rate_rm",
        "evaluate.win_rate_gold",
        "evaluate.lc_win_rate_gold",
        "evaluate.win_rate_judge",
    ),
)


def save_headline_view(ws: Workspace, experiment: str) -> None:
    save_runs_view(ws, experiment, HEADLINE_VIEW, "CreditFlow headline metrics", *HEADLINE_COLUMNS)


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    return {
        f"{stage}.{name}": results[stage]["manifest"]["metrics"][name]
        for stage, names in HEADLINE_METRICS.items()
        if stage in results
        for name in names
        if name in results[stage]["manifest"]["metrics"]
    }


def check_run_name(name: str) -> str:
    if not name.strip() or not name.isprintable() or len(name) > 250:
        raise ValueError(f"run name {name!r}: printable text, at most 250 characters")
    return name


def _pinned(config: dict[str, Any] | None, pinned: bool) -> tuple[dict[str, Any], PipelineConfig]:
    """``config`` with its hub ids pinned, and validated: pinned here unless the caller did it already."""
    return (config or {}, validate(config)) if pinned else pin_hub_revisions(config)


def _refresh_catalog(ws: Workspace) -> None:
    Catalog(ws.catalog_path, ws.store).refresh()


def _readable_run_name() -> str:
    """The MLflow run's name (``run_name``, else the config's method/LoRA/seed), so Prefect's run list says what ran
    instead of showing random words. Prefect calls this as the flow run starts, scheduled runs included."""
    parameters = flow_run.parameters
    try:
        return parameters.get("run_name") or default_run_name(validate(parameters.get("config")))
    except ConfigError:
        return "invalid config"  # the flow itself reports the error, in config words


def _stage_flow(name: str):
    """The Prefect flow that runs stage ``name`` alone (or as a subflow of the pipeline)."""

    def run_stage(
        config: dict[str, Any] | None = None,
        workspace: str | None = None,
        refresh: bool = False,
        mlflow_parent_run_id: str | None = None,
        progress: bool = True,
        upstream: dict[str, dict[str, Any]] | None = None,
        refresh_catalog: bool = True,
        run_name: str | None = None,
        pinned: bool = False,
    ) -> dict[str, Any]:
        """``upstream``: manifests of the earlier stages (the pipeline passes them; alone, they are resolved).
        ``run_name``: the pipeline run's name, which names this flow run in Prefect. ``pinned``: the caller has run
        :func:`pin_hub_revisions` on ``config`` already (a run pins once)."""
        config, cfg = _pinned(config, pinned)
        ws = Workspace.resolve(workspace or cfg.workspace)
        manifests = {k: Manifest.from_dict(m) for k, m in upstream.items()} if upstream is not None else None
        try:
            result = execute_stage(
                name, cfg, ws, manifests, refresh=refresh, parent_run_id=mlflow_parent_run_id, progress=progress
            )
        finally:
            if refresh_catalog:
                _refresh_catalog(ws)
        return result.to_dict()

    run_stage.__name__ = run_stage.__qualname__ = f"{name}_flow"
    return flow(
        name=name, description=STAGES[name].description, flow_run_name=lambda: f"{name}: {_readable_run_name()}"
    )(run_stage)


STAGE_FLOWS = {name: _stage_flow(name) for name in STAGES}
# Module-level names for deployment entrypoints (infra/prefect.yaml: flows/pipeline.py:curate_flow) and imports.
curate_flow = STAGE_FLOWS["curate"]
reward_model_flow = STAGE_FLOWS["reward_model"]
onpolicy_flow = STAGE_FLOWS["onpolicy"]
token_rewards_flow = STAGE_FLOWS["token_rewards"]
policy_flow = STAGE_FLOWS["policy"]
rl_flow = STAGE_FLOWS["rl"]
evaluate_flow = STAGE_FLOWS["evaluate"]


@flow(
    name="creditflow-pipeline",
    description="Curate -> reward model -> token rewards -> policy optimization.",
    flow_run_name=_readable_run_name,
)
def pipeline_flow(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
    progress: bool = True,
    run_name: str | None = None,
    pinned: bool = False,
) -> dict[str, Any]:
    """Run every stage in order under one MLflow parent run (named ``run_name``, default from the config: method,
    T-REG weight, LoRA, seed). ``pinned``: the caller pinned ``config``'s hub ids already (a run pins once; a
    schedule's deployment holds the config as written, so its runs pin here).

    ``from_stage`` recomputes that stage and everything after it, taking earlier stages from the cache (they must
    exist). ``refresh`` names stages to recompute even if cached.
    """
    hash_sources()
    config, cfg = _pinned(config, pinned)
    ws = Workspace.resolve(workspace or cfg.workspace)
    order = [name for name, stage in STAGES.items() if stage.enabled(cfg)]
    refresh = list(refresh or [])
    unknown = [s for s in [*refresh, *([from_stage] if from_stage else [])] if s not in order]
    if unknown:
        raise ValueError(f"unknown or disabled stage {unknown[0]!r} (stages in this config: {', '.join(order)})")
    start = order.index(from_stage) if from_stage else 0
    problems = pipeline_needs(cfg)
    if problems:
        raise ValueError("the stages of this config cannot run together: " + "; ".join(problems))

    run_name = check_run_name(run_name or default_run_name(cfg))
    parent = Run.start(
        ws,
        cfg.experiment,
        run_name,
        tags={"creditflow.kind": "pipeline", "creditflow.from_stage": from_stage or ""},
    )
    save_headline_view(ws, cfg.experiment)
    results: dict[str, Any] = {}
    manifests: dict[str, Manifest] = {}
    try:
        parent.log_params({"workspace": str(ws.root), "stages": ",".join(order), **headline_params(cfg)})
        for index, name in enumerate(order):
            upstream = {u: manifests[u] for u in STAGES[name].upstream if u in manifests}
            if index < start:
                result = execute_stage(
                    name, cfg, ws, upstream, cached_only=True, parent_run_id=parent.run_id, progress=progress
                ).to_dict()
            else:
                result = STAGE_FLOWS[name](
                    config=config,
                    workspace=str(ws.root),
                    refresh=name in refresh or from_stage is not None,
                    mlflow_parent_run_id=parent.run_id,
                    progress=progress,
                    upstream={u: m.to_dict() for u, m in upstream.items()},
                    refresh_catalog=False,
                    run_name=run_name,
                    pinned=True,
                )
            results[name] = result
            manifests[name] = Manifest.from_dict(result["manifest"])
            problems = data_needs(name, manifests[name].metrics, cfg)
            if problems:
                raise ValueError(f"after {name}: " + "; ".join(problems))
            parent.set_tags(
                {
                    f"creditflow.fingerprint.{name}": result["manifest"]["fingerprint"],
                    f"creditflow.cache_hit.{name}": str(result["cache_hit"]).lower(),
                }
            )
        parent.log_metrics({"stages_cached": sum(r["cache_hit"] for r in results.values()), "stages_run": len(results)})
        parent.log_metrics(headline_metrics(results))
    except BaseException:
        parent.end("FAILED")
        raise
    finally:
        _refresh_catalog(ws)
    parent.end("FINISHED")
    return {"mlflow_run_id": parent.run_id, "run_name": run_name, "workspace": str(ws.root), "stages": results}


def run_pipeline(
    config: dict[str, Any] | None = None,
    workspace: str | None = None,
    from_stage: str | None = None,
    refresh: list[str] | None = None,
    progress: bool = True,
    run_name: str | None = None,
) -> dict[str, Any]:
    """What ``creditflow run`` and the demo call: the pipeline flow, or, when every stage is already cached and
    nothing asks for a recompute, :func:`record_cached_run`, which starts no Prefect server and loads no model."""
    config, cfg = pin_hub_revisions(config)  # once: both paths below plan with the same commits
    if not from_stage and not refresh:
        cached = record_cached_run(cfg, workspace, run_name)
        if cached is not None:
            return cached
    return pipeline_flow(
        config=config,
        workspace=workspace,
        from_stage=from_stage,
        refresh=refresh,
        progress=progress,
        run_name=run_name,
        pinned=True,
    )


def run_stage_alone(
    name: str, config: dict[str, Any] | None, workspace: str | None, refresh: bool = False, progress: bool = True
) -> dict[str, Any]:
    """What ``creditflow stage`` calls: a cached stage is recorded (its MLflow run, its ``stage_runs`` row) without
    starting Prefect or loading a model; otherwise the stage's flow runs."""
    if name not in STAGE_FLOWS:
        raise ValueError(f"unknown stage {name!r} (stages: {', '.join(STAGE_FLOWS)})")
    config, cfg = pin_hub_revisions(config)
    if not refresh:
        ws = Workspace.resolve(workspace or cfg.workspace)
        try:
            result = execute_stage(name, cfg, ws, cached_only=True, progress=progress)
        except StageNotReady:
            pass  # it or an upstream must compute: the flow does it, or says what is missing
        else:
            _refresh_catalog(ws)
            return result.to_dict()
    return STAGE_FLOWS[name](config=config, workspace=workspace, refresh=refresh, progress=progress, pinned=True)


def record_cached_run(cfg: PipelineConfig, workspace: str | None, run_name: str | None = None) -> dict[str, Any] | None:
    """If every stage of this config has its artifact, record the run as one light MLflow run (tagged with the
    run that computed each artifact, carrying the headline params and metrics) plus its ``stage_runs`` rows, and
    return it in ``pipeline_flow``'s shape. None when some stage must compute (or the stages' needs fail)."""
    hash_sources()
    if pipeline_needs(cfg):
        return None  # pipeline_flow reports them
    ws = Workspace.resolve(workspace or cfg.workspace)
    manifests: dict[str, Manifest] = {}
    for name, stage in STAGES.items():
        if stage.enabled(cfg):
            plan = plan_stage(name, cfg, {u: manifests[u] for u in stage.upstream if u in manifests})
            if not ws.store.exists(name, plan.fingerprint):
                return None
            manifests[name] = ws.store.load(name, plan.fingerprint)
    run_name = check_run_name(run_name or default_run_name(cfg))
    tags = {"creditflow.kind": "pipeline", "creditflow.cached": "true"}
    for name, manifest in manifests.items():
        tags[f"creditflow.fingerprint.{name}"] = manifest.fingerprint
        tags[f"creditflow.cache_hit.{name}"] = "true"
        tags[f"creditflow.source_run.{name}"] = manifest.mlflow_run_id or ""
    parent = Run.start(ws, cfg.experiment, run_name, tags=tags)
    save_headline_view(ws, cfg.experiment)
    stages = {
        name: {"stage": name, "cache_hit": True, "mlflow_run_id": m.mlflow_run_id, "manifest": m.to_dict()}
        for name, m in manifests.items()
    }
    try:
        parent.log_params({"workspace": str(ws.root), "stages": ",".join(manifests), **headline_params(cfg)})
        parent.log_metrics({"stages_cached": len(stages), "stages_run": len(stages), **headline_metrics(stages)})
        catalog = Catalog(ws.catalog_path, ws.store)
        for manifest in manifests.values():
            record_stage_run(catalog, manifest, parent.run_id, manifest.mlflow_run_id, cache_hit=True)
        catalog.refresh()
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    return {"mlflow_run_id": parent.run_id, "run_name": run_name, "workspace": str(ws.root), "stages": stages}
