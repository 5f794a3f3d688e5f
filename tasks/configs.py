"""Every stage's config: pydantic models on two shared bases, importable without torch or transformers.

Each stage's config adds its own fields to a shared base of tasks/config_base.py (``TrainingConfig`` for
trainers, ``SamplingConfig`` for samplers, as TRL's trainer configs share ``TrainingArguments``). Models forbid
unknown keys (a silently ignored typo would also be silently left out of the cache key) and validate strictly:
``"5"`` is not an int and ``true`` is not a number. Field descriptions are the help text that
``creditflow config --explain`` prints.

These classes are the single source of a stage's knobs: ``model_dump()`` is what the stage's fingerprint and
manifest record, and what ``creditflow config`` prints.
"""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from creditflow.tasks.config_base import (
    PRECISION_MODES,
    DistributedTrainingConfig,
    SamplingConfig,
    StrictConfig,
    TrainingConfig,
)

TRUNCATION_MODES = ("keep_start", "keep_end")
TOKEN_REWARD_SOURCES = ("contrastive", "abc")
TINY_BACKBONE = "tiny"  # reward_model.base_model: a tiny backbone built from the curated text (tests, offline)

# T-REG contrastive prompt presets. Only the attribute lists are from the paper; the wording around them is ours.
# revision: reading A of the spec (the response is embedded and the model is asked to revise it);
# guideline: reading B (the attributes are appended to the instruction; the response is not embedded);
# prefix: a one-line correctness request before the instruction (found by the audit, docs/benchmarks.md).
TEMPLATE_PRESETS = {
    "revision": (
        "{instruction}\n\nHere is a response:\n{response}\n\n"
        "Revise the response to make it more helpful, correct, coherent, and concise.",
        "{instruction}\n\nHere is a response:\n{response}\n\n"
        "Revise the response to make it unhelpful, incorrect, incoherent, and verbose.",
    ),
    "guideline": (
        "{instruction}\n\nYour response should be helpful, correct, coherent, and concise.",
        "{instruction}\n\nYour response should be unhelpful, incorrect, incoherent, and verbose.",
    ),
    "prefix": ("Answer correctly. {instruction}", "Answer incorrectly. {instruction}"),
}
PresetName = Literal[tuple(TEMPLATE_PRESETS)]  # type: ignore[valid-type]
DEFAULT_TEMPLATE = "prefix"  # chosen by `creditflow rewards audit` on SmolLM2 (docs/benchmarks.md)


# ---------------------------------------------------------------------------------------------------------
# Curation


class SourceConfig(StrictConfig):
    """One input. Exactly one of ``path``, ``hf`` or ``builtin``."""

    path: str | None = Field(None, description=".jsonl/.json/.parquet/.csv file, or a datasets.save_to_disk folder.")
    hf: str | None = Field(None, description="datasets.load_dataset name (offline: it must be in the HF cache).")
    builtin: Literal["sample"] | None = Field(None, description="'sample': the bundled synthetic preference set.")
    format: Literal["auto", "explicit", "implicit", "ultrafeedback", "hh_rlhf"] = "auto"
    split: str = Field("train", description="Split of an hf dataset or a saved DatasetDict.")
    name: str | None = Field(None, description="hf dataset config name.")
    data_files: str | list[str] | None = Field(None, description="For hf builders such as json/parquet over files.")
    revision: str | None = Field(None, description="hf dataset revision: a branch, tag or commit (default: main).")
    limit: int | None = Field(None, ge=0, description="Read only the first N rows.")

    @model_validator(mode="after")
    def _one_location(self) -> "SourceConfig":
        given = [k for k in ("path", "hf", "builtin") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"a source needs exactly one of path/hf/builtin, got {given or 'none'}")
        if self.revision and not self.hf:
            raise ValueError("a source's revision applies to hf datasets only")
        return self

    @property
    def label(self) -> str:
        if self.builtin:
            return f"builtin:{self.builtin}"
        if self.hf:
            revision = f"@{self.revision}" if self.revision else ""
            return f"hf:{self.hf}{revision}" + (f"/{self.name}" if self.name else "") + f"[{self.split}]"
        return str(self.path)


class CurateRules(StrictConfig):
    strict_schema: bool = Field(True, description="A malformed row raises (file/row/field); false quarantines it.")
    drop_empty: bool = Field(True, description="Empty or whitespace-only prompt/chosen/rejected turns.")
    drop_identical: bool = Field(True, description="chosen == rejected after whitespace normalization.")
    dedupe: bool = Field(True, description="Exact duplicates of (prompt, chosen, rejected), whitespace-normalized.")
    drop_ties: bool = Field(True, description="score_chosen == score_rejected (rows without scores unaffected).")
    min_margin: float | None = Field(0.0, allow_inf_nan=False, description="Quarantine margins below this; null: off.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Chat-templated prompt with generation prompt.")
    max_response_tokens: int | None = Field(None, ge=1, description="Each of chosen/rejected, EOS included.")
    max_length: int | None = Field(None, ge=1, description="Prompt + the longer response.")
    near_duplicates: bool = Field(
        False, description="Quarantine rows whose prompt near-duplicates an earlier row's (MinHash-LSH), naming it."
    )
    near_duplicate_threshold: float = Field(
        0.8, ge=0.5, le=0.95, description="Jaccard similarity of word 3-grams that makes prompts near-duplicates."
    )


class CurateConfig(StrictConfig):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [SourceConfig(builtin="sample")],
        description="Inputs, read in order; each names one of path (file or folder), hf (hub dataset) or builtin.",
    )
    rules: CurateRules = Field(default_factory=CurateRules)
    tokenizer: str | None = Field(
        None, description="Folder, hub id (org/name[@revision]) or named model; required by the token-length rules."
    )
    decontaminate: list[str] = Field(
        default_factory=list,
        description="Benchmark prompt files (AlpacaEval, Arena-Hard, MT-Bench; any readable format): rows whose prompt "
        "shares an n-gram with one are quarantined, naming the benchmark item.",
    )
    decontaminate_ngram: int = Field(13, ge=1, description="Words per n-gram of the contamination check.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of prompt groups held out (near-duplicate prompts stay together)."
    )
    split_seed: int = Field(0, description="Seeds which prompts are held out.")

    @model_validator(mode="after")
    def _check(self) -> "CurateConfig":
        if not self.sources:
            raise ValueError("curate.sources is empty")
        limits = (self.rules.max_prompt_tokens, self.rules.max_response_tokens, self.rules.max_length)
        if any(limit is not None for limit in limits) and not self.tokenizer:
            raise ValueError("curate.rules token limits need curate.tokenizer (the target model's tokenizer)")
        return self


# ---------------------------------------------------------------------------------------------------------
# Reward model and on-policy pairs


class RewardModelConfig(DistributedTrainingConfig):
    # No clipping by default: the reward models trained before the norm was logged were not clipped either.
    max_grad_norm: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Clip the gradient norm to this; null: no clipping (still logged)."
    )
    base_model: str = Field(
        TINY_BACKBONE, description="Local folder, hub id (org/name[@revision]), a named model ('minilm'), or 'tiny'."
    )
    pretrained: str | None = Field(
        None,
        description="An existing reward model used as it is, not trained: a hub id (org/name[@revision]) or a folder. "
        "A sequence classifier, or custom code (trust_remote_code) whose output carries a `score` (ArmoRM); it keeps "
        "its own tokenizer and chat template. Evaluated on the eval split like a trained one; the training keys are "
        "unused.",
    )
    max_length: int = Field(256, ge=2, description="Tokens of prompt + response; long prompts lose their start.")
    use_margin: bool = Field(False, description="Subtract the curated score margin inside the sigmoid.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Weight of mean((r_c + r_r)^2)."
    )
    eval_batch_size: int = Field(32, ge=1, description="Pairs per forward when scoring the eval split.")
    gradient_checkpointing: bool = Field(False, description="Recompute the backbone's activations in backward.")
    disable_dropout: bool = Field(
        True, description="Train without dropout (TRL's RewardConfig default); false keeps the backbone's dropout."
    )

    @model_validator(mode="after")
    def _pretrained_or_trained(self) -> "RewardModelConfig":
        if self.pretrained is not None and self.base_model != TINY_BACKBONE:
            raise ValueError("reward_model: pretrained (use a reward model) and base_model (train one) are exclusive")
        return self


class OnPolicyConfig(SamplingConfig):
    enabled: bool = Field(False, description="Sample pairs from the reference model instead of the curated ones.")
    samples_per_prompt: int = Field(4, description="k responses per prompt; best vs worst become the pair.")
    min_margin: float = Field(0.0, ge=0, allow_inf_nan=False, description="Best - worst reward must exceed this.")

    @field_validator("samples_per_prompt")
    @classmethod
    def _two_samples(cls, value: int) -> int:
        if value < 2:
            raise ValueError("onpolicy.samples_per_prompt must be >= 2 to form a pair")
        return value


# ---------------------------------------------------------------------------------------------------------
# Token rewards


class TokenRewardsConfig(StrictConfig):
    sources: list[Literal["contrastive", "abc"]] = Field(
        default_factory=lambda: ["contrastive"], description="'contrastive' (T-REG) and/or 'abc'."
    )
    max_length: int | None = Field(1024, ge=2, description="Prompt + completion tokens, as the policy truncates.")
    max_prompt_length: int | None = Field(512, ge=1, description="A longer prompt keeps its last N tokens.")
    truncation: Literal["keep_start", "keep_end"] = Field(
        "keep_start", description="Over max_length: keep_start cuts the completion's tail, keep_end the prompt's head."
    )
    template: Literal[(*TEMPLATE_PRESETS, "custom")] = Field(  # type: ignore[valid-type]
        DEFAULT_TEMPLATE, description="Contrastive prompt preset; 'custom' uses better_template / worse_template."
    )
    better_template: str | None = Field(None, description="custom only: str.format with {instruction} [{response}].")
    worse_template: str | None = Field(None, description="custom only: its contrast; literal braces as {{ }}.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward (each response needs 3).")
    rows_per_shard: int = Field(256, ge=1, description="Cache rows per shard: the unit of resumption.")
    abc_beta: float = Field(0.8, ge=0, le=1, description="ABC mixing coefficient (Chan et al. 2024 use 0.8).")
    abc_max_length: int | None = Field(None, ge=2, description="RM tokens; null: the RM's training max_length.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto: the policy stage's precision (policy_precision on CUDA; fp32 on CPU), so DPO's margin "
        "starts at 0; float32 / bfloat16: plain weights of that dtype (bfloat16: faster, approximate).",
    )
    policy_precision: Literal[PRECISION_MODES] = Field(  # type: ignore[valid-type]
        "bf16-autocast",
        description="What dtype: auto matches on a GPU. Derived by the pipeline from the policy section, which "
        "replaces any value here: float32, bf16-autocast (fp32 weights under bf16 autocast) or bf16-params (bf16 "
        "weights: a LoRA policy's base, FSDP2's compute parameters).",
    )
    device: str = Field("auto", description="auto (cuda if available) | cpu | cuda | cuda:N.")
    heatmap_pairs: int = Field(3, ge=0, description="Sample pairs logged as HTML/PNG heat maps.")

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"token_rewards.sources must be a non-empty subset of {TOKEN_REWARD_SOURCES}")
        return value

    @model_validator(mode="after")
    def _templates(self) -> "TokenRewardsConfig":
        check_templates(self.template, self.better_template, self.worse_template, "token_rewards.")
        return self

    def templates(self) -> tuple[str, str]:
        """(better, worse) prompt templates: the preset's, or the custom strings."""
        return resolve_templates(self.template, self.better_template, self.worse_template)

    def cache_fields(self) -> dict[str, str]:
        """The exact template texts: part of the stage fingerprint, so editing a preset's wording is a miss."""
        better, worse = self.templates()
        return {"better_text": better, "worse_text": worse}


def check_templates(template: str, better: str | None, worse: str | None, prefix: str) -> None:
    """A preset takes no custom strings; ``custom`` takes both, each with {instruction} and, in both or neither,
    {response}. ``prefix``: where the keys live (``token_rewards.``, ``rl.contrastive_``)."""
    better_key, worse_key = f"{prefix}better_template", f"{prefix}worse_template"
    if template != "custom":
        if better is not None or worse is not None:
            raise ValueError(f"{better_key} / {worse_key} need {prefix}template: custom")
        return
    if better is None or worse is None:
        raise ValueError(f"{prefix}template custom needs both {better_key} and {worse_key}")
    uses_response = {}
    for key, text in ((better_key, better), (worse_key, worse)):
        fields = _placeholders(text, key)
        if "instruction" not in fields or not fields <= {"instruction", "response"}:
            raise ValueError(
                f"{key}: placeholders are {{instruction}} (required) and {{response}}, got {sorted(fields)}"
            )
        uses_response[key] = "response" in fields
    if len(set(uses_response.values())) > 1:
        # One prompt with the response in context and one without compares copying, not quality.
        raise ValueError(f"{better_key} / {worse_key}: both templates embed {{response}}, or neither does")


def resolve_templates(template: str, better: str | None, worse: str | None) -> tuple[str, str]:
    """(better, worse) prompt templates: the preset's, or the custom strings."""
    return (better, worse) if template == "custom" else TEMPLATE_PRESETS[template]


def _placeholders(template: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (write literal braces as {{{{ }}}})") from None


# ---------------------------------------------------------------------------------------------------------
# Policy optimization


class PreferenceLossConfig(StrictConfig):
    loss_type: Literal["dpo", "ipo", "simpo"] = Field(
        "dpo", description="dpo: sigmoid; ipo: squared; simpo: length-normalized, no reference model."
    )
    beta: float = Field(0.1, gt=0, allow_inf_nan=False, description="Scale of the implicit reward (KL strength).")
    alpha: float = Field(0.0, ge=0, allow_inf_nan=False, description="T-REG weight; 0 disables the regularizer.")
    gamma: float = Field(0.5, allow_inf_nan=False, description="SimPO target margin (not gamma/beta).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO only (conservative DPO).")
    rpo_alpha: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Weight of the chosen responses' token NLL (RPO, TRL's rpo_alpha)."
    )

    @model_validator(mode="after")
    def _smoothing_is_dpo_only(self) -> "PreferenceLossConfig":
        if self.label_smoothing and self.loss_type != "dpo":
            raise ValueError(f"policy.loss.label_smoothing applies to dpo only, not {self.loss_type}")
        return self


class LoraConfig(StrictConfig):
    """LoRA adapters (Hu et al. 2021) on ``target_modules``; saved merged into the weights, as an adapter, or both."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, allow_inf_nan=False, description="The update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters.",
    )
    save_adapter: bool = Field(True, description="Save the PEFT adapter alone, in adapter/.")
    save_merged: bool = Field(
        True,
        description="Save the merged weights in model/. false writes only the adapter; later stages and "
        "`creditflow export` rebuild the merged model from the base + adapter when they need it.",
    )

    @model_validator(mode="after")
    def _saves_something(self) -> "LoraConfig":
        if not (self.save_merged or self.save_adapter):
            raise ValueError("save_merged: false needs save_adapter: true (else the trained model is not saved)")
        return self


class PolicyConfig(DistributedTrainingConfig):
    learning_rate: float = Field(5e-7, gt=0, allow_inf_nan=False, description="Peak AdamW learning rate.")
    loss: PreferenceLossConfig = Field(default_factory=PreferenceLossConfig)
    token_reward_source: Literal["contrastive", "abc", "none"] = Field(
        "contrastive", description="r_hat for the T-REG term; 'none' needs loss.alpha == 0."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute decoder activations in backward.")
    length_grouped: bool = Field(True, description="Batch pairs of similar length together to cut padding.")
    chunk_size: int = Field(1024, ge=1, description="Completion positions per LM-head chunk.")
    lora: LoraConfig | None = None
    compile: bool = Field(
        False, description="torch.compile the decoder; batch widths are bucketed (multiples of 64) to bound recompiles."
    )

    @model_validator(mode="after")
    def _regularizer_needs_rewards(self) -> "PolicyConfig":
        if self.token_reward_source == "none" and self.loss.alpha != 0:
            raise ValueError("policy.token_reward_source 'none' needs loss.alpha == 0 (the regularizer needs r_hat)")
        return self


# ---------------------------------------------------------------------------------------------------------
# Online RL


class RolloutSampling(SamplingConfig):
    """How the policy samples its rollouts. T = 1, top_p = 1 and top_k = 0 by default: the policy gradient assumes
    the samples come from the policy itself. Always transformers' generate(), in the trainer or, with the
    pipeline's ``compute.backend: ray``, on Ray actors that hold copies of the policy and get its new weights every
    iteration (the same token ids either way). vLLM is not supported: its engine would need the new weights every
    iteration."""

    backend: Literal["hf"] = Field(
        "hf", description="hf only: rollouts come from the policy being trained (on Ray actors with compute: ray)."
    )
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="1 only: sample from the policy itself.")
    top_p: float = Field(1.0, gt=0, le=1, description="1 only: the whole nucleus.")
    top_k: int = Field(0, ge=0, description="0 only: sample from the whole vocabulary (the policy itself).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per rollout.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Prompts per generate() call and per shard, the unit of seeding and of Ray scheduling "
        "(rl.batch_size / compute.workers keeps every worker busy).",
    )
    max_prompts: int | None = Field(None, ge=1, description="First N train-split prompts to train on.")

    @field_validator("temperature", "top_p", "top_k")
    @classmethod
    def _from_the_policy_itself(cls, value: float, info: ValidationInfo) -> float:
        # The ratio, the KL and the entropy use the policy's own probabilities (T = 1, the whole vocabulary): a
        # tempered or truncated sampler would make every rollout off-policy, and T = 0 makes the k samples of a
        # prompt identical, so group advantages are all 0.
        neutral = 0 if info.field_name == "top_k" else 1
        if value != neutral:
            raise ValueError(
                f"online RL samples from the policy itself: {info.field_name} must be {neutral} (got {value}), "
                "as the policy gradient's log-probs are the untempered policy's"
            )
        return value


class RewardFunction(StrictConfig):
    """A verifiable reward: ``function(prompts, completions) -> one float per completion``, imported from the
    installed environment (never from workspace files), weighted into the rollout's reward."""

    function: str = Field(description="'package.module:function'.")
    weight: float = Field(1.0, allow_inf_nan=False, description="Its weight in the summed reward.")

    @field_validator("function")
    @classmethod
    def _spec(cls, value: str) -> str:
        module, _, name = value.partition(":")
        if not module or not name:
            raise ValueError(f"{value!r}: expected 'package.module:function'")
        return value


class RLConfig(TrainingConfig):
    """Online RL from the reference policy (PPO, RLOO or GRPO) on per-token rewards; tasks/recipes/rl.py says what
    each knob does.
    One iteration samples ``batch_size`` prompts x ``samples_per_prompt`` rollouts and makes ``ppo_epochs`` passes
    of ``minibatches`` optimizer steps over them; ``epochs`` passes over the train prompts (``max_steps`` caps the
    iterations)."""

    enabled: bool = Field(False, description="Train an RL policy too (evaluate then compares it with the others).")
    algorithm: Literal["ppo", "rloo", "rloo_token", "grpo"] = Field(
        "ppo",
        description="ppo: value head + GAE; rloo: sequence-level leave-one-out (TRL's RLOO); rloo_token: per-position "
        "leave-one-out on returns-to-go, which keeps dense token credit; grpo: group-normalized sequence advantages "
        "plus the group-normalized token credit of the reward source (credit_weight).",
    )
    reward_source: Literal["sparse", "abc", "contrastive", "abc+contrastive", "dpo_implicit", "function"] = Field(
        "abc",
        description="sparse: RM score on the last token; abc: spread by the RM's attention (official form); "
        "contrastive: sparse + contrastive_scale * r_hat from the reference model; abc+contrastive: both; "
        "dpo_implicit: sparse + implicit_beta * log(pi_dpo / pi_ref) per token from the policy stage (RTO); "
        "function: sparse + the per-token credit of credit_function.",
    )
    credit_function: str | None = Field(
        None,
        description="reward_source function: 'package.module:function(rollouts) -> per-token credit', one sequence "
        "of floats per rollout, as long as its completion_ids (a checker of each step, a process reward).",
    )
    reward_model_weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="Weight of the RM score; 0: reward_functions replace the RM."
    )
    reward_functions: list[RewardFunction] = Field(
        default_factory=list,
        description="Verifiable rewards summed with the RM: 'package.module:function' or {function, weight}.",
    )
    learning_rate: float = Field(1e-5, gt=0, allow_inf_nan=False, description="Peak AdamW learning rate.")
    batch_size: int = Field(8, ge=1, description="Prompts per iteration.")
    max_steps: int | None = Field(None, ge=1, description="Iterations; caps epochs. null: no cap.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of optimizer steps with linear warmup.")
    samples_per_prompt: int = Field(1, ge=1, description="Rollouts per prompt (k); RLOO needs k >= 2.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each iteration's rollouts.")
    minibatches: int = Field(2, ge=1, description="Optimizer steps per pass.")
    clip_range: float = Field(0.2, gt=0, lt=1, allow_inf_nan=False, description="Ratio clip epsilon (below 1).")
    clip_range_high: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Ratio clip above 1 (DAPO's clip-higher: 0.28); null: clip_range."
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo",
        description="Loss aggregation, TRL's names: dapo token mean; grpo mean of per-sequence means; dr_grpo sum "
        "over rows x max_new_tokens.",
    )
    scale_rewards: bool = Field(True, description="grpo: divide the group-centred rewards by the group's std.")
    credit_weight: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="grpo: weight of the group-normalized token credit (dense sources)."
    )
    truncated: Literal["keep", "mask", "penalize"] = Field(
        "keep",
        description="Rollouts that hit max_new_tokens without EOS: keep; mask them out of the loss; or penalize.",
    )
    truncation_penalty: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="truncated: penalize subtracts this from their reward."
    )
    value_clip: float = Field(0.2, gt=0, allow_inf_nan=False, description="PPO value clip epsilon (ppo only).")
    vf_coef: float = Field(0.1, ge=0, allow_inf_nan=False, description="Value-loss weight (ppo only).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (ppo's GAE; rloo and rloo_token use 1).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo only).")
    whiten_advantages: bool | None = Field(
        None, description="Standardize advantages over each iteration's tokens; null: yes, but not for grpo."
    )
    kl_coef: float = Field(0.05, ge=0, allow_inf_nan=False, description="Per-token KL penalty to pi_ref.")
    kl_penalty: Literal["reward", "loss"] = Field(
        "reward",
        description="reward: -kl_coef * (log pi - log pi_ref) per token in the reward; loss: kl_coef * the k3 "
        "estimator added to the loss per token (TRL's GRPO).",
    )
    kl_target: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Adaptive KL controller target; null: fixed kl_coef."
    )
    kl_horizon: int = Field(10000, ge=1, description="Adaptive KL controller horizon, in samples.")
    abc_beta: float = Field(0.8, ge=0, le=1, description="ABC: share of r spread by attention (the paper: 0.8).")
    contrastive_scale: float = Field(1.0, ge=0, allow_inf_nan=False, description="Weight of r_hat_t per token.")
    contrastive_template: Literal[(*TEMPLATE_PRESETS, "custom")] = Field(  # type: ignore[valid-type]
        DEFAULT_TEMPLATE, description="T-REG prompt preset for the contrastive reward; 'custom': the two below."
    )
    contrastive_better_template: str | None = Field(
        None, description="contrastive_template custom: str.format with {instruction} [{response}]."
    )
    contrastive_worse_template: str | None = Field(None, description="contrastive_template custom: its contrast.")
    implicit_beta: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="dpo_implicit: beta_1; null: the policy stage's loss.beta."
    )
    disable_dropout: bool = Field(
        True,
        description="Dropout off in the whole policy, LoRA adapters included (TRL's RL trainers): the first "
        "minibatch's ratio is then exactly 1.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute decoder activations in backward.")
    chunk_size: int = Field(1024, ge=1, description="Response positions per LM-head chunk.")
    lora: LoraConfig | None = None
    sampling: RolloutSampling = Field(default_factory=RolloutSampling)
    gold_scorer: str | None = Field("vader", description="Logged on every iteration's rollouts (reward curves).")

    @field_validator("credit_function")
    @classmethod
    def _credit_spec(cls, value: str | None) -> str | None:
        return value if value is None else RewardFunction(function=value).function

    @field_validator("reward_functions", mode="before")
    @classmethod
    def _function_specs(cls, value):
        if isinstance(value, list):  # a bare 'package.module:function' has weight 1
            return [{"function": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RLConfig":
        if self.algorithm in ("rloo", "rloo_token", "grpo") and self.samples_per_prompt < 2:
            baseline = "the group statistics" if self.algorithm == "grpo" else "the leave-one-out baseline"
            raise ValueError(f"rl.algorithm {self.algorithm!r} needs samples_per_prompt >= 2 ({baseline})")
        if self.reward_model_weight == 0 and not self.reward_functions:
            raise ValueError("rl: reward_model_weight 0 needs reward_functions (otherwise there is no reward)")
        check_templates(
            self.contrastive_template,
            self.contrastive_better_template,
            self.contrastive_worse_template,
            "rl.contrastive_",
        )
        if (self.reward_source == "function") != (self.credit_function is not None):
            raise ValueError("rl.reward_source 'function' and rl.credit_function go together")
        if self.reward_model_weight == 0 and "abc" in self.reward_source:
            raise ValueError(f"rl.reward_source {self.reward_source!r} spreads the RM's score: reward_model_weight > 0")
        if self.kl_target is not None and self.kl_coef == 0:
            # The adaptive controller scales the coefficient: from 0 it stays 0, and the target would do nothing.
            raise ValueError("rl.kl_target needs rl.kl_coef > 0 (the controller adapts kl_coef by a factor)")
        rollouts = self.batch_size * self.samples_per_prompt
        if rollouts < self.minibatches * self.grad_accum:
            raise ValueError(
                f"rl: {rollouts} rollouts per iteration cannot fill {self.minibatches} minibatches x "
                f"{self.grad_accum} micro-batches (raise batch_size or samples_per_prompt)"
            )
        return self

    def cache_fields(self) -> dict[str, str]:
        if "contrastive" not in self.reward_source:
            return {}
        better, worse = self.contrastive_templates()
        return {"better_template_text": better, "worse_template_text": worse}

    def contrastive_templates(self) -> tuple[str, str]:
        return resolve_templates(
            self.contrastive_template, self.contrastive_better_template, self.contrastive_worse_template
        )


# ---------------------------------------------------------------------------------------------------------
# Evaluation


class EvaluateConfig(SamplingConfig):
    max_prompts: int | None = Field(64, ge=1, description="Eval-split prompts, in curated order.")
    temperature: float = Field(0.7, ge=0, allow_inf_nan=False, description="0 decodes greedily.")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")
    gold_scorer: str | None = Field("vader", description="'vader', 'package.module:function', or null.")
    judge: str | None = Field(
        None,
        description="A local chat model (folder or hub id) judging each policy's answer against the reference's, "
        "in both orders (tasks/infer/judging.py); null: no judge.",
    )
    judge_batch_size: int = Field(8, ge=1, description="Judge prompts per forward.")
    lm_eval_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on the reference and on each policy (the alignment tax); needs "
        "creditflow[eval]. Empty: none.",
    )
    lm_eval_include_path: str | None = Field(
        None, description="A folder of your own harness task YAMLs (relative to the config file)."
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="Documents per task; null: all.")
    lm_eval_batch_size: int = Field(8, ge=1, description="Harness batch size.")


class AuditConfig(StrictConfig):
    """The optional ``audit`` stage: do the token rewards point the right way (tasks/recipes/audit.py)?"""

    enabled: bool = Field(False, description="Run the token-reward audit after evaluation.")
    presets: list[PresetName] = Field(
        default_factory=lambda: list(TEMPLATE_PRESETS), description="Contrastive template presets to audit."
    )
    per_kind: int = Field(40, ge=1, description="Planted-error items per kind (arithmetic, counting, ...).")
    sentiment: int = Field(60, ge=0, description="Sentiment-flip items from the bundled task.")
    probe: str | None = Field(None, description="Your JSONL of prompt, response, bad_spans.")
    seed: int = Field(0, description="Probe seed.")
    max_length: int = Field(512, ge=2, description="Prompt + response tokens.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward.")


def method_label(policy_config: dict) -> str:
    """ "dpo", "dpo + T-REG (contrastive, α=0.25)", ... from a policy manifest's config."""
    loss = policy_config.get("loss", {})
    label = loss.get("loss_type", "policy")
    if loss.get("alpha", 0):
        label += f" + T-REG ({policy_config.get('token_reward_source', '?')}, α={loss['alpha']:g})"
    return label
