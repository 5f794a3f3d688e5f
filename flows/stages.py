"""The one code path every stage (flows/registry.py) runs through.

For each stage: fingerprint = sha256(upstream artifact digests + input digests + normalized config + code version).
A stage is planned once (:func:`plan_stage`) from its upstream manifests; the plan travels to the compute task,
which trusts it. The fingerprint is the Prefect cache key of that task (results persisted in the workspace), so an
identical rerun is a cache hit in any process; the artifact store is checked too, so a hit never points at a
deleted artifact. Every execution, hit or miss, gets an MLflow run tagged with stage, fingerprint and cache_hit,
and a row in the catalog's ``stage_runs`` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from creditflow.flows.config import PipelineConfig
from creditflow.flows.registry import STAGES, Stage
from creditflow.storage.artifacts import ArtifactError, Manifest
from creditflow.storage.catalog import Catalog
from creditflow.storage.hashing import code_version, sha256_json
from creditflow.storage.leases import Lease, hold_lease
from creditflow.storage.tracking import Run, client_for
from creditflow.storage.workspace import Workspace
from creditflow.tasks.stage import StageContext

FINGERPRINT_CHARS = 24
TAG = "creditflow."


def hash_sources() -> None:
    """Hash every stage's source now, before a long run gives anyone time to edit it (hashing._source_digest)."""
    for stage in STAGES.values():
        code_version(stage.code_modules())


class StageNotReady(RuntimeError):
    """An upstream artifact a stage needs is not in the workspace."""


@dataclass(kw_only=True)
class StagePlan:
    """Everything a stage's execution needs, computed once: its fingerprint, typed config and upstream manifests."""

    stage: Stage
    fingerprint: str
    inputs: dict[str, Any]
    config: dict[str, Any]  # normalized: what the fingerprint covers and the manifest records
    section: Any  # the stage's config section, typed
    reference_model: str | None
    upstream: dict[str, Manifest]
    code: str  # the code version the fingerprint covers (storage/hashing.code_version)
    compute: Any = None  # where inference runs (ComputeConfig): never part of the fingerprint
    trust_remote_code: bool = False  # may model folders run their own code: never part of the fingerprint either


def active_upstream(name: str, cfg: PipelineConfig) -> list[str]:
    """Upstream stages that run and are read under this config (a disabled optional stage is not an input)."""
    unused = STAGES[name].unused_upstream(cfg)
    return [u for u in STAGES[name].upstream if STAGES[u].enabled(cfg) and u not in unused]


def plan_stage(name: str, cfg: PipelineConfig, upstream: dict[str, Manifest]) -> StagePlan:
    stage = STAGES[name]
    section = stage.section(cfg)
    upstream = {u: upstream[u] for u in active_upstream(name, cfg)}
    inputs = {"upstream": {u: m.digest for u, m in upstream.items()}, **stage.input_digests(cfg)}
    config = {**section.model_dump(mode="json"), **section.cache_fields()}
    reference = cfg.reference_model if stage.uses_reference else None
    if reference is not None:
        config["reference_model"] = reference
    code = code_version(stage.code_modules(cfg))
    key = {"stage": name, "config": config, "inputs": inputs, "code": code}
    fingerprint = sha256_json(key)[:FINGERPRINT_CHARS]
    return StagePlan(
        stage=stage,
        fingerprint=fingerprint,
        inputs=inputs,
        config=config,
        section=section,
        reference_model=reference,
        upstream=upstream,
        code=code,
        compute=cfg.compute,
        trust_remote_code=cfg.trust_remote_code,
    )


def resolve_upstream(name: str, cfg: PipelineConfig, workspace: Workspace) -> dict[str, Manifest]:
    """Manifests of every stage ``name`` depends on, for this config, from the artifact store (each planned once)."""
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
    plan: StagePlan = parameters["plan"]
    return f"{plan.stage.name}-{plan.fingerprint}"


def _output_path(output: str) -> str:
    """A declared output: ``name/`` a folder, ``name.ext`` a file, ``name`` a Parquet table."""
    if output.endswith("/"):
        return output.removesuffix("/")
    return output if "." in output else f"{output}.parquet"


def missing_outputs(stage: Stage, folder: Path) -> list[str | tuple[str, ...]]:
    """The declared outputs of ``stage`` that ``folder`` lacks; a group of alternatives needs one of them."""

    def present(output: str | tuple[str, ...]) -> bool:
        group = (output,) if isinstance(output, str) else output
        return any((folder / _output_path(o)).exists() for o in group)

    return [output for output in stage.outputs if not present(output)]


def _computed(manifest: Manifest) -> dict[str, Any]:
    """What :func:`compute_stage` returns (and Prefect persists): the manifest and the MLflow run that made it."""
    return {"manifest": manifest.to_dict(), "computed_by": manifest.mlflow_run_id}


@task(name="compute-stage", persist_result=True, result_serializer="json", cache_key_fn=_cache_key)
def compute_stage(
    plan: StagePlan, workspace_root: str, mlflow_run_id: str, refresh: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Compute one stage into the artifact store; returns its manifest and the MLflow run that produced it."""
    name, fingerprint = plan.stage.name, plan.fingerprint
    workspace = Workspace.resolve(workspace_root)
    store = workspace.store
    if not refresh and store.exists(name, fingerprint):  # published by another process since the caller looked
        return _computed(store.load(name, fingerprint))

    store.sweep_stale_tmp(name)
    run = Run(client_for(workspace), mlflow_run_id)
    writer = store.writer(name, fingerprint)
    try:
        context = StageContext(
            config=plan.section,
            workspace=workspace,
            upstream=plan.upstream,
            writer=writer,
            run=run,
            progress=progress,
            stage=name,
            fingerprint=fingerprint,
            reference_model=plan.reference_model,
            compute=plan.compute,
            trust_remote_code=plan.trust_remote_code,
        )
        # the lease keeps `artifacts gc` off this run's checkpoints, cache shards and upstream artifacts
        upstream = tuple((m.stage, m.fingerprint) for m in plan.upstream.values())
        with hold_lease(workspace.root, Lease(name, fingerprint, upstream)):
            metrics = plan.stage.compute(context)
        missing = missing_outputs(plan.stage, writer.dir)
        if missing:
            raise ArtifactError(f"{name}: the stage did not write its declared outputs {missing}")
        manifest = store.publish(
            writer,
            stage=name,
            fingerprint=fingerprint,
            inputs=plan.inputs,
            config=plan.config,
            code_version=plan.code,
            metrics=metrics,
            mlflow_run_id=mlflow_run_id,
            replace=refresh,
        )
    except BaseException:
        store.discard(writer)
        raise
    run.log_metrics(metrics)
    return _computed(manifest)


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


def record_stage_run(catalog: Catalog, manifest: Manifest, pipeline_run_id, mlflow_run_id, cache_hit: bool) -> None:
    catalog.record_stage_run(
        pipeline_run_id=pipeline_run_id,
        mlflow_run_id=mlflow_run_id,
        stage=manifest.stage,
        fingerprint=manifest.fingerprint,
        digest=manifest.digest,
        cache_hit=cache_hit,
        row_counts=manifest.row_counts,
    )


def execute_stage(
    name: str,
    cfg: PipelineConfig,
    workspace: Workspace,
    upstream: dict[str, Manifest] | None = None,
    *,
    refresh: bool = False,
    cached_only: bool = False,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> StageResult:
    """Run (or reuse) one stage with its own MLflow run.

    ``upstream`` are the manifests of the stages before it (a pipeline passes what it just ran); without them they
    are resolved from the store. ``cached_only`` refuses to compute (for ``--from``). The catalog gets a
    ``stage_runs`` row; refreshing its views is the caller's job (once per pipeline).
    """
    if upstream is None:
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
        run.log_params({name: plan.config})  # "policy.loss.alpha": comparable across runs and stages
        compute = compute_stage.with_options(
            result_storage=workspace.prefect_results_dir,
            refresh_cache=refresh,
            task_run_name=f"{name}-{plan.fingerprint[:10]}",
        )
        arguments = dict(
            plan=plan, workspace_root=str(workspace.root), mlflow_run_id=run.run_id, refresh=refresh, progress=progress
        )
        if not refresh and workspace.store.exists(name, plan.fingerprint):  # a hit needs no Prefect task run
            result = _computed(workspace.store.load(name, plan.fingerprint))
        else:
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
        record_stage_run(
            Catalog(workspace.catalog_path, workspace.store), manifest, parent_run_id, run.run_id, cache_hit
        )
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    return StageResult(name, manifest, cache_hit, run.run_id)
