"""The stage registry: every stage's upstream stages, outputs, recipe, hashed code and inputs outside the store.

A stage's recipe is ``creditflow.tasks.<recipe>.compute_<name>(ctx)``; flows/stages.py plans and runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from creditflow.flows.config import PipelineConfig
from creditflow.tasks.configs import TINY_BACKBONE
from creditflow.tasks.stage import StageContext


def _tasks(*names: str) -> tuple[str, ...]:
    return tuple(f"creditflow.tasks.{name}" for name in names)


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    upstream: tuple[str, ...]
    outputs: tuple[str, ...]  # tables (<name>.parquet) and folders (<name>/) every artifact of this stage holds
    recipe: str  # module in creditflow.tasks whose compute_<name>(ctx) runs the stage (imported when it runs)
    # Modules whose source changes the stage's rows (hashed, not imported); a test checks that every module the
    # recipe reaches is here, bar plumbing that cannot change rows.
    code_modules: tuple[str, ...]
    input_digests: Callable[[PipelineConfig], dict[str, Any]] = lambda cfg: {}  # inputs outside the store
    uses_reference: bool = False  # reads the pipeline's reference_model (so it is part of its config)
    optional: bool = False  # runs only when its section says ``enabled: true``

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
    from creditflow.storage.hashing import sha256_file

    probe = {"probe": sha256_file(cfg.audit.probe)} if cfg.audit.probe else {}
    return {**_reference_inputs(cfg), **probe}


def _token_rewards_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    # Only contrastive rows come from the reference model; ABC reads the reward model (an upstream artifact).
    return _reference_inputs(cfg) if "contrastive" in cfg.token_rewards.sources else {}


STAGES: dict[str, Stage] = {
    "curate": Stage(
        name="curate",
        description="Ingest, validate, dedupe, filter and split preference data; quarantine rejected rows.",
        upstream=(),
        outputs=("pairs", "quarantine"),
        recipe="curate",
        code_modules=_tasks("curate", "ingest", "schema", "tokenization"),
        input_digests=_curate_inputs,
    ),
    "reward_model": Stage(
        name="reward_model",
        description="Train a Bradley-Terry reward model on the curated pairs; evaluate on the eval split.",
        upstream=("curate",),
        outputs=("eval_scores", "model/"),
        recipe="reward_model",
        code_modules=_tasks(
            "reward_model",
            "reward_scoring",
            "training",
            "fsdp",
            "torchrun_worker",
            "tokenization",
            "model_card",
            "schema",
            "tiny",
        ),
        input_digests=_reward_model_inputs,
    ),
    "onpolicy": Stage(
        name="onpolicy",
        description="Sample k responses per prompt from the reference policy; reward-model best vs worst become pairs.",
        upstream=("curate", "reward_model"),
        outputs=("pairs", "quarantine"),
        recipe="onpolicy",
        code_modules=_tasks("onpolicy", "generation", "reward_scoring", "schema", "tokenization", "training"),
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
        code_modules=_tasks(
            "token_rewards", "contrastive", "abc", "reward_scoring", "logprobs", "tokenization", "schema", "training"
        )
        + ("creditflow.storage.token_cache",),
        input_digests=_token_rewards_inputs,
        uses_reference=True,
    ),
    "policy": Stage(
        name="policy",
        description="DPO / IPO / SimPO with the T-REG regularizer from cached token rewards and reference log-probs.",
        upstream=("curate", "onpolicy", "token_rewards"),
        outputs=("train_log", "train_timings", "model/"),
        recipe="policy",
        # The starting model is the token-reward stage's reference, already in that stage's digest.
        code_modules=_tasks(
            "policy",
            "torchrun_worker",
            "causal_lm",
            "fsdp",
            "preference_batches",
            "training",
            "losses",
            "logprobs",
            "tokenization",
            "abc",
            "reward_scoring",
            "schema",
            "model_card",
        ),
    ),
    "rl": Stage(
        name="rl",
        description="Online RL (PPO / RLOO) from the reference on dense token rewards (sparse, ABC, contrastive).",
        upstream=("curate", "reward_model"),
        outputs=("train_log", "train_timings", "samples", "model/"),
        recipe="rl",
        code_modules=_tasks(
            "rl",
            "rl_rewards",
            "rl_losses",
            "causal_lm",
            "generation",
            "abc",
            "contrastive",
            "reward_scoring",
            "logprobs",
            "tokenization",
            "training",
            "gold",
            "schema",
            "model_card",
        ),
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
        code_modules=_tasks("evaluate", "generation", "reward_scoring", "gold", "schema", "tokenization", "training"),
    ),
    "audit": Stage(
        name="audit",
        description="Token-reward audit: AUC of planted-error tokens per source (contrastive presets, ABC, DPO).",
        upstream=("reward_model", "policy"),
        outputs=("audit",),
        recipe="audit",
        code_modules=_tasks(
            "audit",
            "audit_probes",
            "contrastive",
            "abc",
            "logprobs",
            "reward_scoring",
            "tokenization",
            "training",
            "schema",
            "ingest",
        ),
        input_digests=_audit_inputs,
        uses_reference=True,
        optional=True,
    ),
}
