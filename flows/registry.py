"""The stage registry: every stage's upstream stages, outputs, recipe, hashed code and inputs outside the store.

A stage's recipe is ``creditflow.tasks.<recipe>.compute_<name>(ctx)``; flows/stages.py plans and runs it.
"""

from __future__ import annotations

import ast
import copy
import importlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from creditflow.flows.config import PipelineConfig, validate
from creditflow.storage.hashing import module_source, sha256_file
from creditflow.tasks.configs import TINY_BACKBONE
from creditflow.tasks.stage import StageContext

# Modules a recipe imports that cannot change what it writes: plumbing, MLflow figures, model resolution (the
# resolved files are input digests), config classes (their dump is in the fingerprint), Ray (tested equal to local).
NOT_ROW_CHANGING = frozenset({"stage", "plots", "token_view", "distributed", "models", "configs", "config_base"})


def _tasks_imports(module: str) -> set[str]:
    """The creditflow.tasks modules ``module``'s source imports, at top level or inside functions (parsed, not
    imported, so planning costs no torch import)."""
    tree = ast.parse(module_source(f"creditflow.tasks.{module}"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "creditflow.tasks":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("creditflow.tasks."):
            found.add(node.module.split(".")[2])
    return found


def reached_modules(recipe: str) -> set[str]:
    """Every creditflow.tasks module ``recipe`` reaches through its imports, bar NOT_ROW_CHANGING (not followed)."""
    reached, todo = set(), [recipe]
    while todo:
        module = todo.pop()
        if module not in reached and module not in NOT_ROW_CHANGING:
            reached.add(module)
            todo += _tasks_imports(module)
    return reached


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    upstream: tuple[str, ...]
    # Tables (<name>.parquet) and folders (<name>/) every artifact of this stage holds; a tuple of them: at least one.
    outputs: tuple[str | tuple[str, ...], ...]
    recipe: str  # module in creditflow.tasks whose compute_<name>(ctx) runs the stage (imported when it runs)
    extra_code: tuple[str, ...] = ()  # row-changing modules the recipe does not import (a worker run by name)
    input_digests: Callable[[PipelineConfig], dict[str, Any]] = lambda cfg: {}  # inputs outside the store
    uses_reference: bool = False  # reads the pipeline's reference_model (so it is part of its config)
    optional: bool = False  # runs only when its section says ``enabled: true``

    @cached_property
    def code_modules(self) -> tuple[str, ...]:
        """Modules whose source changes the stage's rows (hashed into its fingerprint): all its recipe reaches."""
        return tuple(sorted(f"creditflow.tasks.{m}" for m in reached_modules(self.recipe))) + self.extra_code

    def section(self, cfg: PipelineConfig):
        return getattr(cfg, self.name)

    def enabled(self, cfg: PipelineConfig) -> bool:
        return not self.optional or self.section(cfg).enabled

    def compute(self, ctx: StageContext) -> dict[str, float]:
        return getattr(importlib.import_module(f"creditflow.tasks.{self.recipe}"), f"compute_{self.name}")(ctx)


# ---------------------------------------------------------------------------------------------------------
# Inputs outside the artifact store: data files, models, tokenizers


def _resolve(key: str, spec: str) -> Path:
    """The folder of a model or tokenizer spec; an error names the config key."""
    from creditflow.tasks.models import resolve_model

    try:
        return resolve_model(spec)
    except (ValueError, ModuleNotFoundError) as exc:
        raise ValueError(f"{key}: {exc}") from None


def _model_digest(key: str, spec: str) -> dict[str, str]:
    """Weights and tokenizer files of the model ``key`` names: both change what a stage computes (read as bytes, so
    planning imports no transformers). A hub snapshot also records its commit."""
    from creditflow.tasks.models import model_fingerprint, tokenizer_files_digest

    folder = _resolve(key, spec)
    digest = {"weights": model_fingerprint(folder), "tokenizer": tokenizer_files_digest(folder)}
    if folder.parent.name == "snapshots":  # a hub id: the folder is named by the resolved commit
        digest["revision"] = folder.name
    return digest


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The config keys that name a model or tokenizer (a hub dataset's pin is its source's `revision`).
MODEL_KEYS = ("reference_model", "reward_model.base_model", "curate.tokenizer")


def pin_hub_revisions(config: dict[str, Any] | None) -> tuple[dict[str, Any], PipelineConfig]:
    """Validate ``config`` and pin every hub id in it to the commit it resolves to now: a model or tokenizer
    becomes ``org/name@<commit>``, a hub dataset source gets ``revision: <commit>``.

    A run pins once, at its start, and hands the pinned config on: planning, the recipe, its torchrun or Ray
    workers and later stages (which read the spec from upstream manifests) then all load the one snapshot the
    fingerprint covers, even if the branch moves mid-run, and the manifests say which commit it was.
    """
    from creditflow.tasks.models import is_hub_id

    cfg = validate(config)  # errors in config words first
    pinned = copy.deepcopy(config or {})
    changed = False
    for dotted in MODEL_KEYS:
        *sections, key = dotted.split(".")
        holder = pinned
        for section in sections:
            holder = holder.get(section) if isinstance(holder, dict) else None
        spec = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(spec, str) and is_hub_id(spec) and not _COMMIT.match(spec.partition("@")[2]):
            holder[key] = f"{spec.partition('@')[0]}@{_resolve(dotted, spec).name}"
            changed = True
    raw_sources = (pinned.get("curate") or {}).get("sources") or []
    for raw, source in zip(raw_sources, cfg.curate.sources):
        if isinstance(raw, dict) and source.hf and not _COMMIT.match(source.revision or ""):
            from creditflow.tasks.ingest import hub_dataset_snapshot

            snapshot = hub_dataset_snapshot(source)
            if snapshot is not None:
                raw["revision"] = snapshot.name
                changed = True
    return pinned, (validate(pinned) if changed else cfg)


def _curate_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    from creditflow.tasks.ingest import source_digest

    digests = []
    for i, source in enumerate(cfg.curate.sources):
        try:
            digests.append(source_digest(source))
        except ValueError as exc:
            raise ValueError(f"curate.sources[{i}]: {exc}") from None
    inputs: dict[str, Any] = {"sources": digests}
    if cfg.curate.tokenizer:
        from creditflow.tasks.models import tokenizer_files_digest

        inputs["tokenizer"] = tokenizer_files_digest(_resolve("curate.tokenizer", cfg.curate.tokenizer))
    return inputs


def _reward_model_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    base = cfg.reward_model.base_model
    if base == TINY_BACKBONE:
        return {"base_model": {"tiny": "built from the upstream data"}}
    return {"base_model": _model_digest("reward_model.base_model", base)}


def _reference_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    return {"reference_model": _model_digest("reference_model", cfg.reference_model)}


def _audit_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    probe = {"probe": sha256_file(cfg.audit.probe)} if cfg.audit.probe else {}
    return {**_reference_inputs(cfg), **probe}


def _token_rewards_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    # Only contrastive rows come from the reference model; ABC reads the reward model (an upstream artifact).
    return _reference_inputs(cfg) if "contrastive" in cfg.token_rewards.sources else {}


TRAINED_LM = ("model/", "adapter/")  # merged weights and/or the LoRA adapter (lora.save_merged: false)

STAGES: dict[str, Stage] = {
    "curate": Stage(
        name="curate",
        description="Ingest, validate, dedupe, filter and split preference data; quarantine rejected rows.",
        upstream=(),
        outputs=("pairs", "quarantine"),
        recipe="curate",
        input_digests=_curate_inputs,
    ),
    "reward_model": Stage(
        name="reward_model",
        description="Train a Bradley-Terry reward model on the curated pairs; evaluate on the eval split.",
        upstream=("curate",),
        outputs=("eval_scores", "model/"),
        recipe="reward_model",
        extra_code=("creditflow.tasks.torchrun_worker",),  # launched by torchrun
        input_digests=_reward_model_inputs,
    ),
    "onpolicy": Stage(
        name="onpolicy",
        description="Sample k responses per prompt from the reference policy; reward-model best vs worst become pairs.",
        upstream=("curate", "reward_model"),
        outputs=("pairs", "quarantine"),
        recipe="onpolicy",
        input_digests=_reference_inputs,
        uses_reference=True,
        optional=True,
    ),
    "token_rewards": Stage(
        name="token_rewards",
        description="Per-token rewards (T-REG contrastive prompting, ABC) and reference log-probs, cached by content.",
        upstream=("curate", "reward_model", "onpolicy"),
        outputs=("token_rewards",),
        recipe="token_rewards",
        extra_code=("creditflow.storage.token_cache",),
        input_digests=_token_rewards_inputs,
        uses_reference=True,
    ),
    "policy": Stage(
        name="policy",
        description="DPO / IPO / SimPO with the T-REG regularizer from cached token rewards and reference log-probs.",
        upstream=("curate", "onpolicy", "token_rewards"),
        outputs=("train_log", "train_timings", TRAINED_LM),
        recipe="policy",
        extra_code=("creditflow.tasks.torchrun_worker",),  # launched by torchrun
        # No input digests: the starting model is the token-reward stage's reference, already in that stage's.
    ),
    "rl": Stage(
        name="rl",
        description="Online RL (PPO / RLOO) from the reference on dense token rewards (sparse, ABC, contrastive).",
        upstream=("curate", "reward_model"),
        outputs=("train_log", "train_timings", "samples", TRAINED_LM),
        recipe="rl",
        input_digests=_reference_inputs,
        uses_reference=True,
        optional=True,
    ),
    "evaluate": Stage(
        name="evaluate",
        description="Policy vs reference on held-out prompts: reward-model and gold scores, win rates, comparisons.",
        upstream=("curate", "reward_model", "token_rewards", "policy", "rl"),
        outputs=("generations",),
        recipe="evaluate",
    ),
    "audit": Stage(
        name="audit",
        description="Token-reward audit: AUC of planted-error tokens per source (contrastive presets, ABC, DPO).",
        upstream=("reward_model", "policy"),
        outputs=("audit",),
        recipe="audit",
        input_digests=_audit_inputs,
        uses_reference=True,
        optional=True,
    ),
}
