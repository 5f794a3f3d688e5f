"""The stage registry: every stage's upstream stages, outputs, hashed code and inputs outside the store.

A stage's recipe is the function ``flows/recipes.py`` maps its name to; flows/stages.py plans and runs it. Its code
digest covers every module that recipe's module reaches through imports (storage/hashing.reached_modules).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

from creditflow.flows.config import PipelineConfig, validate
from creditflow.storage.hashing import reached_modules, sha256_file, sha256_tree, table_modules
from creditflow.tasks.configs import TINY_BACKBONE, SourceConfig
from creditflow.tasks.data.ingest import hub_dataset_snapshot, source_digest
from creditflow.tasks.models.hub import is_hub_id
from creditflow.tasks.models.resolve import model_fingerprint, resolve_model, tokenizer_files_digest
from creditflow.tasks.stage import StageContext

RECIPES_MODULE = "creditflow.flows.recipes"  # read as source for hashing; imported when a stage computes


@cache
def recipe_modules() -> dict[str, str]:
    """Stage name -> the module of its recipe function, read from flows/recipes.py without importing it."""
    return table_modules(RECIPES_MODULE, "RECIPES")


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    upstream: tuple[str, ...]
    # Tables (<name>.parquet) and folders (<name>/) every artifact of this stage holds; a tuple of them: at least one.
    outputs: tuple[str | tuple[str, ...], ...]
    input_digests: Callable[[PipelineConfig], dict[str, Any]] = lambda cfg: {}  # inputs outside the store
    # Modules the recipe imports but does not run under this config (a token-reward source not asked for).
    unused_code: Callable[[PipelineConfig], set[str]] = lambda cfg: set()
    # Upstream stages it reads only under some configs (the RL stage reads the DPO policy for dpo_implicit only).
    unused_upstream: Callable[[PipelineConfig], set[str]] = lambda cfg: set()
    uses_reference: bool = False  # reads the pipeline's reference_model (so it is part of its config)
    optional: bool = False  # runs only when its section says ``enabled: true``

    def code_modules(self, cfg: PipelineConfig | None = None) -> tuple[str, ...]:
        """Modules whose source the stage runs (hashed into its fingerprint): all its recipe reaches under ``cfg``
        (under any config when None)."""
        return reached_modules([recipe_modules()[self.name]], stop=self.unused_code(cfg) if cfg else ())

    def section(self, cfg: PipelineConfig):
        return getattr(cfg, self.name)

    def enabled(self, cfg: PipelineConfig) -> bool:
        return not self.optional or self.section(cfg).enabled

    def compute(self, ctx: StageContext) -> dict[str, float]:
        from creditflow.flows.recipes import RECIPES  # deferred: planning must not import torch (docs/environment.md)

        return RECIPES[self.name](ctx)


# ---------------------------------------------------------------------------------------------------------
# Inputs outside the artifact store: data files, models, tokenizers


def _resolve(key: str, spec: str) -> Path:
    """The folder of a model or tokenizer spec; an error names the config key."""

    try:
        return resolve_model(spec)
    except (ValueError, ModuleNotFoundError) as exc:
        raise ValueError(f"{key}: {exc}") from None


def _model_digest(key: str, spec: str) -> dict[str, str]:
    """Weights and tokenizer files of the model ``key`` names: both change what a stage computes (read as bytes, so
    planning imports no transformers). A hub snapshot also records its commit."""

    folder = _resolve(key, spec)
    digest = {"weights": model_fingerprint(folder), "tokenizer": tokenizer_files_digest(folder)}
    if folder.parent.name == "snapshots":  # a hub id: the folder is named by the resolved commit
        digest["revision"] = folder.name
    return digest


_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# The config keys that name a model or tokenizer (a hub dataset's pin is its source's `revision`).
MODEL_KEYS = (
    "reference_model",
    "reward_model.base_model",
    "reward_model.pretrained",
    "curate.tokenizer",
    "evaluate.judge",
)


def pin_hub_revisions(config: dict[str, Any] | None) -> tuple[dict[str, Any], PipelineConfig]:
    """Validate ``config`` and pin every hub id in it to the commit it resolves to now: a model or tokenizer
    becomes ``org/name@<commit>``, a hub dataset source gets ``revision: <commit>``.

    A run pins once, at its start, and hands the pinned config on: planning, the recipe, its torchrun or Ray
    workers and later stages (which read the spec from upstream manifests) then all load the one snapshot the
    fingerprint covers, even if the branch moves mid-run, and the manifests say which commit it was.
    """

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
            snapshot = hub_dataset_snapshot(source)
            if snapshot is not None:
                raw["revision"] = snapshot.name
                changed = True
    return pinned, (validate(pinned) if changed else cfg)


def _curate_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    digests = []
    for i, source in enumerate(cfg.curate.sources):
        try:
            digests.append(source_digest(source))
        except ValueError as exc:
            raise ValueError(f"curate.sources[{i}]: {exc}") from None
    inputs: dict[str, Any] = {"sources": digests}
    if cfg.curate.decontaminate:
        inputs["benchmarks"] = [source_digest(SourceConfig(path=path)) for path in cfg.curate.decontaminate]
    if cfg.curate.tokenizer:
        inputs["tokenizer"] = tokenizer_files_digest(_resolve("curate.tokenizer", cfg.curate.tokenizer))
    return inputs


def _reward_model_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    if cfg.reward_model.pretrained is not None:  # the resolved snapshot is the reward model
        return {"pretrained": _model_digest("reward_model.pretrained", cfg.reward_model.pretrained)}
    base = cfg.reward_model.base_model
    if base == TINY_BACKBONE:
        return {"base_model": {"tiny": "built from the upstream data"}}
    return {"base_model": _model_digest("reward_model.base_model", base)}


def _reference_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    return {"reference_model": _model_digest("reference_model", cfg.reference_model)}


def _audit_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    probe = {"probe": sha256_file(cfg.audit.probe)} if cfg.audit.probe else {}
    return {**_reference_inputs(cfg), **probe}


def _unused_token_sources(cfg: PipelineConfig) -> set[str]:
    """The modules of the token-reward sources this config does not ask for (the recipe's SOURCES table)."""
    sources = table_modules(recipe_modules()["token_rewards"], "SOURCES")
    return {module for name, module in sources.items() if name not in cfg.token_rewards.sources}


def _rl_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The reference, and the source file of each user reward or credit function (an edit to it changes the
    rewards) and of a plugin gold scorer (it scores the logged rollouts)."""
    specs = {f"rl.reward_functions[{i}]": spec.function for i, spec in enumerate(cfg.rl.reward_functions)}
    if cfg.rl.credit_function:
        specs["rl.credit_function"] = cfg.rl.credit_function
    functions = {spec: _module_source_digest(key, spec) for key, spec in specs.items()}
    return {
        **_reference_inputs(cfg),
        **({"reward_functions": functions} if functions else {}),
        **_gold_scorer_inputs("rl.gold_scorer", cfg.rl.gold_scorer),
    }


def _gold_scorer_inputs(key: str, spec: str | None) -> dict[str, str]:
    """A plugin gold scorer's source file; the built-in 'vader' is code the stage already hashes."""
    return {} if spec in (None, "vader") else {"gold_scorer": _module_source_digest(key, spec)}


def _module_source_digest(key: str, spec: str) -> str:
    module = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ValueError(f"{key} {spec!r}: no installed module {module!r}")
    return sha256_file(found.origin)


def _token_rewards_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    # Only contrastive rows come from the reference model; ABC reads the reward model (an upstream artifact).
    return _reference_inputs(cfg) if "contrastive" in cfg.token_rewards.sources else {}


def _evaluate_inputs(cfg: PipelineConfig) -> dict[str, Any]:
    """The judge model, a plugin gold scorer's source, and for capability checks the harness's version and the user's
    task files."""
    inputs: dict[str, Any] = _gold_scorer_inputs("evaluate.gold_scorer", cfg.evaluate.gold_scorer)
    if cfg.evaluate.judge:
        inputs["judge"] = _model_digest("evaluate.judge", cfg.evaluate.judge)
    if cfg.evaluate.lm_eval_tasks:
        try:
            inputs["lm_eval"] = importlib.metadata.version("lm-eval")
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                "evaluate.lm_eval_tasks needs lm-evaluation-harness: pip install 'creditflow[eval]'"
            ) from None
        folder = cfg.evaluate.lm_eval_include_path
        if folder is not None:
            if not Path(folder).is_dir():
                raise ValueError(f"evaluate.lm_eval_include_path: {folder} is not a folder")
            inputs["lm_eval_tasks"] = sha256_tree(folder)
    return inputs


TRAINED_LM = ("model/", "adapter/")  # merged weights and/or the LoRA adapter (lora.save_merged: false)

STAGES: dict[str, Stage] = {
    "curate": Stage(
        name="curate",
        description="Ingest, validate, dedupe, filter and split preference data; quarantine rejected rows.",
        upstream=(),
        outputs=("pairs", "quarantine"),
        input_digests=_curate_inputs,
    ),
    "reward_model": Stage(
        name="reward_model",
        description="Train a Bradley-Terry reward model on the curated pairs (or use a pretrained one); evaluate on "
        "the eval split.",
        upstream=("curate",),
        outputs=("eval_scores", ("model/", "pretrained.json")),  # trained, or reward_model.pretrained's record
        input_digests=_reward_model_inputs,
    ),
    "onpolicy": Stage(
        name="onpolicy",
        description="Sample k responses per prompt from the reference policy; reward-model best vs worst become pairs.",
        upstream=("curate", "reward_model"),
        outputs=("pairs", "quarantine"),
        input_digests=_reference_inputs,
        uses_reference=True,
        optional=True,
    ),
    "token_rewards": Stage(
        name="token_rewards",
        description="Per-token rewards (T-REG contrastive prompting, ABC) and reference log-probs, cached by content.",
        upstream=("curate", "reward_model", "onpolicy"),
        outputs=("token_rewards",),
        input_digests=_token_rewards_inputs,
        unused_code=_unused_token_sources,
        uses_reference=True,
    ),
    "policy": Stage(
        name="policy",
        description="DPO / IPO / SimPO with the T-REG regularizer from cached token rewards and reference log-probs.",
        upstream=("curate", "onpolicy", "token_rewards"),
        outputs=("train_log", "train_timings", TRAINED_LM),
        # No input digests: the starting model is the token-reward stage's reference, already in that stage's.
    ),
    "rl": Stage(
        name="rl",
        description="Online RL (PPO / RLOO / GRPO) from the reference on dense token rewards (sparse, ABC, "
        "contrastive, DPO-implicit) and user reward functions.",
        upstream=("curate", "reward_model", "policy"),
        outputs=("train_log", "train_timings", "samples", TRAINED_LM),
        input_digests=_rl_inputs,
        unused_upstream=lambda cfg: set() if cfg.rl.reward_source == "dpo_implicit" else {"policy"},
        uses_reference=True,
        optional=True,
    ),
    "evaluate": Stage(
        name="evaluate",
        description="Policy vs reference on held-out prompts: reward-model and gold scores, an LLM judge, raw and "
        "length-controlled win rates, comparisons.",
        upstream=("curate", "reward_model", "token_rewards", "policy", "rl"),
        outputs=("generations",),
        input_digests=_evaluate_inputs,
    ),
    "audit": Stage(
        name="audit",
        description="Token-reward audit: AUC of planted-error tokens per source (contrastive presets, ABC, DPO).",
        upstream=("reward_model", "policy"),
        outputs=("audit",),
        input_digests=_audit_inputs,
        uses_reference=True,
        optional=True,
    ),
}
