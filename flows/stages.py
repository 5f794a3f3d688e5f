"""Stage registry and the one code path every stage runs through.

For each stage: fingerprint = sha256(upstream artifact digests + input digests + normalized config + code version).
The fingerprint is the Prefect cache key of the compute task (results persisted in the workspace), so an identical
rerun is a cache hit in any process; the artifact store is checked too, so a hit never points at a deleted artifact.
Every execution, hit or miss, gets an MLflow run tagged with stage, fingerprint and cache_hit, and a row in the
catalog's ``stage_runs`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from prefect import task
from prefect.context import TaskRunContext

from creditflow.flows.config import PipelineConfig, config_from_dict, to_dict
from creditflow.storage.artifacts import ArtifactError, Manifest
from creditflow.storage.catalog import Catalog
from creditflow.storage.hashing import code_version, sha256_json
from creditflow.storage.tracking import Run, client_for
from creditflow.storage.workspace import Workspace
from creditflow.tasks import (
    abc,
    curate,
    evaluate,
    ingest,
    logprobs,
    losses,
    onpolicy,
    policy,
    policy_worker,
    reward_model,
    schema,
    token_rewards,
    token_store,
    tokenization,
)
from creditflow.tasks.stage import StageContext

FINGERPRINT_CHARS = 24
TAG = "creditflow."


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    upstream: tuple[str, ...]
    section: Callable[[PipelineConfig], Any]  # the stage's config section
    input_digests: Callable[[Any], dict[str, Any]]  # digests of non-artifact inputs (data files, tokenizers, models)
    compute: Callable[[StageContext], dict[str, float]]
    code_modules: tuple[ModuleType, ...]  # modules whose source changes the stage's rows
    enabled: Callable[[PipelineConfig], bool] = lambda cfg: True  # optional stages are skipped when disabled


def _curate_inputs(config: curate.CurateConfig) -> dict[str, Any]:
    inputs: dict[str, Any] = {"sources": [ingest.source_digest(s) for s in config.sources]}
    if config.tokenizer:
        inputs["tokenizer"] = tokenization.tokenizer_fingerprint(tokenization.load_tokenizer(config.tokenizer))
    return inputs


def _model_digest(spec: str) -> dict[str, str]:
    """Weights and tokenizer of a model spec: both change what a stage computes."""
    from creditflow.tasks.models import model_fingerprint, resolve_model

    if spec == reward_model.TINY:
        return {"tiny": "built from the upstream data"}
    folder = resolve_model(spec)
    tokenizer = tokenization.tokenizer_fingerprint(tokenization.load_tokenizer(str(folder)))
    return {"weights": model_fingerprint(folder), "tokenizer": tokenizer}


STAGES: dict[str, Stage] = {
    "curate": Stage(
        name="curate",
        description="Ingest, validate, dedupe, filter and split preference data; quarantine rejected rows.",
        upstream=(),
        section=lambda cfg: cfg.curate,
        input_digests=_curate_inputs,
        compute=curate.compute_curate,
        code_modules=(curate, ingest, schema, tokenization),
    ),
    "reward_model": Stage(
        name="reward_model",
        description="Train a Bradley-Terry reward model on the curated pairs; evaluate on the eval split.",
        upstream=("curate",),
        section=lambda cfg: cfg.reward_model,
        input_digests=lambda c: {"base_model": _model_digest(c.base_model)},
        compute=reward_model.compute_reward_model,
        code_modules=(reward_model, tokenization),
    ),
    "onpolicy": Stage(
        name="onpolicy",
        description="Sample k responses per prompt from the reference policy; reward-model best vs worst become pairs.",
        upstream=("curate", "reward_model"),
        section=lambda cfg: cfg.onpolicy,
        input_digests=lambda c: {"policy": _model_digest(c.policy)},
        compute=onpolicy.compute_onpolicy,
        code_modules=(onpolicy, reward_model, schema, tokenization),
        enabled=lambda cfg: cfg.onpolicy.enabled,
    ),
    "token_rewards": Stage(
        name="token_rewards",
        description="Per-token rewards (T-REG contrastive prompting, ABC) and reference log-probs, cached by content.",
        upstream=("curate", "reward_model", "onpolicy"),
        section=lambda cfg: cfg.token_rewards,
        input_digests=token_store.input_digests,
        compute=token_store.compute_token_rewards,
        code_modules=(token_store, token_rewards, abc, logprobs, tokenization, schema),
    ),
    "policy": Stage(
        name="policy",
        description="DPO / IPO / SimPO with the T-REG regularizer from cached token rewards and reference log-probs.",
        upstream=("curate", "onpolicy", "token_rewards"),
        section=lambda cfg: cfg.policy,
        input_digests=lambda c: {},  # the starting model is the token-reward stage's reference, in its digest
        compute=policy.compute_policy,
        code_modules=(policy, policy_worker, losses, logprobs, tokenization, abc),
    ),
    "evaluate": Stage(
        name="evaluate",
        description="Policy vs reference on held-out prompts: reward-model and gold scores, win rates, comparisons.",
        upstream=("curate", "reward_model", "token_rewards", "policy"),
        section=lambda cfg: cfg.evaluate,
        input_digests=lambda c: {},
        compute=evaluate.compute_evaluate,
        code_modules=(evaluate, onpolicy),
    ),
}


# Hash every stage's source as imported, before a long run gives anyone time to edit it (hashing._source_digest).
for _stage in STAGES.values():
    code_version(_stage.code_modules)


class StageNotReady(RuntimeError):
    """An upstream artifact a stage needs is not in the workspace."""


@dataclass
class StagePlan:
    stage: Stage
    fingerprint: str
    inputs: dict[str, Any]
    config: dict[str, Any]


def active_upstream(name: str, cfg: PipelineConfig) -> list[str]:
    """Upstream stages that run under this config (a disabled optional stage is not an input)."""
    return [u for u in STAGES[name].upstream if STAGES[u].enabled(cfg)]


def plan_stage(name: str, cfg: PipelineConfig, upstream: dict[str, Manifest]) -> StagePlan:
    stage = STAGES[name]
    section = stage.section(cfg)
    digests = {u: upstream[u].digest for u in active_upstream(name, cfg)}
    inputs = {"upstream": digests, **stage.input_digests(section)}
    config = to_dict(section)
    key = {"stage": name, "config": config, "inputs": inputs, "code": code_version(stage.code_modules)}
    return StagePlan(stage, sha256_json(key)[:FINGERPRINT_CHARS], inputs, config)


def resolve_upstream(name: str, cfg: PipelineConfig, workspace: Workspace) -> dict[str, Manifest]:
    """Manifests of every stage ``name`` depends on, for this config, from the artifact store."""
    resolved: dict[str, Manifest] = {}

    def visit(stage_name: str) -> Manifest:
        if stage_name not in resolved:
            deps = {u: visit(u) for u in active_upstream(stage_name, cfg)}
            plan = plan_stage(stage_name, cfg, deps)
            if not workspace.store.exists(stage_name, plan.fingerprint):
                raise StageNotReady(
                    f"stage {name!r} needs the {stage_name!r} artifact for this config "
                    f"(fingerprint {plan.fingerprint}), which is not in {workspace.root}; "
                    f"run `creditflow run` (or `creditflow stage {stage_name}`) first"
                )
            resolved[stage_name] = workspace.store.load(stage_name, plan.fingerprint)
        return resolved[stage_name]

    for upstream_name in active_upstream(name, cfg):
        visit(upstream_name)
    return resolved


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"{parameters['stage_name']}-{parameters['fingerprint']}"


@task(name="compute-stage", persist_result=True, result_serializer="json", cache_key_fn=_cache_key)
def compute_stage(
    stage_name: str,
    fingerprint: str,
    config: dict[str, Any],
    upstream: dict[str, dict[str, Any]],
    workspace_root: str,
    mlflow_run_id: str,
    refresh: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute one stage into the artifact store; returns its manifest and the MLflow run that produced it."""
    workspace = Workspace.resolve(workspace_root)
    store = workspace.store
    if not refresh and store.exists(stage_name, fingerprint):
        manifest = store.load(stage_name, fingerprint)
        return {"manifest": manifest.to_dict(), "computed_by": manifest.mlflow_run_id}

    cfg = config_from_dict(config)
    upstream_manifests = {name: Manifest.from_dict(m) for name, m in upstream.items()}
    plan = plan_stage(stage_name, cfg, upstream_manifests)
    if plan.fingerprint != fingerprint:
        raise RuntimeError(
            f"{stage_name}: inputs changed while the stage was starting "
            f"(fingerprint {plan.fingerprint} != {fingerprint})"
        )
    store.sweep_stale_tmp(stage_name)
    run = Run(client_for(workspace), mlflow_run_id)
    writer = store.writer(stage_name, fingerprint)
    try:
        context = StageContext(
            plan.stage.section(cfg), workspace, upstream_manifests, writer, run, progress, stage_name, fingerprint
        )
        metrics = plan.stage.compute(context)
        manifest = store.publish(
            writer,
            stage=stage_name,
            fingerprint=fingerprint,
            inputs=plan.inputs,
            config=plan.config,
            code_version=code_version(plan.stage.code_modules),
            metrics=metrics,
            mlflow_run_id=mlflow_run_id,
            replace=refresh,
        )
    except BaseException:
        store.discard(writer)
        raise
    run.log_metrics(metrics)
    return {"manifest": manifest.to_dict(), "computed_by": manifest.mlflow_run_id}


@dataclass
class StageResult:
    stage: str
    manifest: Manifest
    cache_hit: bool
    mlflow_run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "cache_hit": self.cache_hit,
            "mlflow_run_id": self.mlflow_run_id,
            "manifest": self.manifest.to_dict(),
        }


def execute_stage(
    name: str,
    cfg: PipelineConfig,
    workspace: Workspace,
    *,
    refresh: bool = False,
    cached_only: bool = False,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Run (or reuse) one stage with its own MLflow run. ``cached_only`` refuses to compute (for ``--from``)."""
    upstream = resolve_upstream(name, cfg, workspace)
    plan = plan_stage(name, cfg, upstream)
    if cached_only and not workspace.store.exists(name, plan.fingerprint):
        raise StageNotReady(
            f"--from needs a cached {name!r} artifact for this config (fingerprint {plan.fingerprint}); "
            "run the whole pipeline once"
        )
    run = Run.start(
        workspace,
        cfg.experiment,
        name,
        tags={TAG + "stage": name, TAG + "fingerprint": plan.fingerprint, TAG + "kind": "stage"},
        parent_run_id=parent_run_id,
    )
    try:
        run.log_params(plan.config)
        compute = compute_stage.with_options(
            result_storage=workspace.prefect_results_dir,
            refresh_cache=refresh,
            task_run_name=f"{name}-{plan.fingerprint[:10]}",
        )
        arguments = dict(
            stage_name=name,
            fingerprint=plan.fingerprint,
            config=to_dict(cfg),
            upstream={k: m.to_dict() for k, m in upstream.items()},
            workspace_root=str(workspace.root),
            mlflow_run_id=run.run_id,
            refresh=refresh,
            progress=progress,
        )
        result = compute(**arguments)
        if not workspace.store.exists(name, plan.fingerprint):
            # Prefect remembered a result whose artifact was deleted since (gc, manual cleanup): recompute.
            result = compute.with_options(refresh_cache=True)(**arguments)
        manifest = workspace.store.load(name, plan.fingerprint)
        cache_hit = result["computed_by"] != run.run_id
        run.set_tags(
            {
                TAG + "cache_hit": str(cache_hit).lower(),
                TAG + "digest": manifest.digest,
                TAG + "source_run_id": manifest.mlflow_run_id or "",
            }
        )
        if cache_hit:
            run.log_metrics(manifest.metrics)
        run.log_metrics({f"rows.{table}": n for table, n in manifest.row_counts.items()})
        run.log_dict(manifest.to_dict(), "manifest.json")
        catalog = Catalog(workspace.catalog_path, workspace.store)
        catalog.record_stage_run(
            pipeline_run_id=parent_run_id,
            mlflow_run_id=run.run_id,
            stage=name,
            fingerprint=plan.fingerprint,
            digest=manifest.digest,
            cache_hit=cache_hit,
            row_counts=manifest.row_counts,
        )
        catalog.refresh()
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    return StageResult(name, manifest, cache_hit, run.run_id)


__all__ = [
    "STAGES",
    "Stage",
    "StageNotReady",
    "StageResult",
    "ArtifactError",
    "execute_stage",
    "plan_stage",
    "resolve_upstream",
]
