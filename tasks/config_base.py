"""The shared bases of every stage's config (tasks/configs.py): strict pydantic models, the trainer base, the
sampler base and where inference runs.

``TrainingConfig`` holds what every trainer shares (optimizer, schedule, batching, checkpoints) and
``SamplingConfig`` what every sampler shares, as TRL's trainer configs share ``TrainingArguments``. Importable
without torch or transformers.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# How a trainer computes on a GPU: float32 (bf16: false); bf16-autocast (fp32 master weights under bf16 autocast:
# full fine-tuning with DDP); bf16-params (bf16 weights under autocast: LoRA's frozen bf16 base, FSDP2's bf16
# compute parameters). The last two differ: fp32 weights keep the residual stream in fp32, bf16 ones round it at
# every layer, so a reference scored one way is not the policy at step 0 the other way.
PRECISION_MODES = ("float32", "bf16-autocast", "bf16-params")


def precision_mode(config: "TrainingConfig") -> str:
    """One of PRECISION_MODES: what a trainer with this config computes with on a GPU."""
    if not config.bf16:
        return "float32"
    bf16_params = getattr(config, "lora", None) is not None or getattr(config, "strategy", "ddp") == "fsdp"
    return "bf16-params" if bf16_params else "bf16-autocast"


class StrictConfig(BaseModel):
    """Base of every config section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    def cache_fields(self) -> dict:
        """Derived values the stage fingerprint must also cover (none by default)."""
        return {}


class TrainingConfig(StrictConfig):
    """What every trainer shares: AdamW, cosine schedule with warmup, batching, seeds and checkpoints."""

    learning_rate: float = Field(5e-5, gt=0, allow_inf_nan=False, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="AdamW decay (not on norms, biases).")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Share of steps with linear warmup before cosine decay.")
    epochs: int = Field(1, ge=1, description="Passes over the train split.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; caps epochs. null: no cap.")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch (and per process under DDP).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    seed: int = Field(0, description="Seeds initialization and the data order.")
    bf16: bool = Field(True, description="bf16 autocast over fp32 weights on CUDA; CPU always trains in fp32.")
    save_every: int = Field(50, ge=1, description="Optimizer steps between resumable checkpoints.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, allow_inf_nan=False, description="Clip the gradient norm to this; null: no clipping (still logged)."
    )


class DistributedTrainingConfig(TrainingConfig):
    """A trainer that also runs under torchrun: DDP or FSDP2, on one node or several."""

    num_processes: int = Field(1, ge=1, description="1: in-process; N > 1: torchrun with DDP (gloo/nccl).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: a full copy per process; fsdp: FSDP2 shards weights, gradients and AdamW state over the "
        "processes (torchrun, even for 1 process), bf16 params and compute with fp32 reduction on CUDA.",
    )
    fsdp_cpu_offload: bool = Field(False, description="fsdp: keep sharded params and optimizer state in CPU memory.")
    nnodes: int = Field(
        1,
        ge=1,
        description="Nodes of num_processes each; > 1: node 0 runs the stage, the others `creditflow join STAGE` "
        "(rendezvous at $CREDITFLOW_RDZV_ENDPOINT, a workspace shared by all).",
    )

    packing: bool = Field(
        False,
        description="Pack each micro-batch's sequences into rows without padding; attention stays inside each "
        "sequence (flex_attention, or flash-attn's varlen kernel when installed; SDPA with a block mask on CPU).",
    )
    packing_tokens: int | None = Field(
        None, ge=16, description="packing: tokens per packed row; null: the whole micro-batch in one row."
    )

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> "DistributedTrainingConfig":
        if self.fsdp_cpu_offload and self.strategy != "fsdp":
            raise ValueError("fsdp_cpu_offload needs strategy: fsdp")
        return self

    @property
    def in_process(self) -> bool:
        """True when the stage trains in its own process (no torchrun)."""
        return self.num_processes == 1 and self.nnodes == 1 and self.strategy == "ddp"


class SamplingConfig(StrictConfig):
    """What every sampler shares (on-policy pairs, evaluation): seeded nucleus sampling, batched prompts."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers generate(); vllm: a vLLM engine per worker (GPU; creditflow[vllm])."
    )
    temperature: float = Field(0.8, ge=0, allow_inf_nan=False, description="0 decodes greedily.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(50, ge=0, description="Sample from the k likeliest tokens (transformers' default); 0: off.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate() call.")
    seed: int = Field(0, description="Same seed and settings, same samples.")
    max_prompts: int | None = Field(None, ge=1, description="First N prompts of the split, in curated order.")

    @field_validator("backend")
    @classmethod
    def _vllm_is_installed(cls, backend: str) -> str:
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("backend 'vllm' needs vLLM, which is not installed: pip install 'creditflow[vllm]' (GPU)")
        return backend


# ---------------------------------------------------------------------------------------------------------
# Where inference runs


class ComputeConfig(StrictConfig):
    """Where inference runs (token-reward scoring, on-policy sampling, evaluation answers, reward-model scores): in
    this process, or on a Ray cluster (one actor per worker, each holding the model). Results are the same either
    way (bit for bit at the same CPU thread count; Ray gives an actor as many threads as it reserves CPUs, and
    other counts can move the last float bit), so none of this is part of any cache key."""

    backend: Literal["local", "ray"] = Field("local", description="local: this process; ray: Ray actors.")
    address: str | None = Field(
        None, description="Ray cluster: 'auto' (the running one), 'ray://host:10001', or null: start a local one."
    )
    workers: int = Field(2, ge=1, description="Ray actors, each holding one copy of the model.")
    gpus_per_worker: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="GPUs each actor reserves (1: one actor per GPU)."
    )
    cpus_per_worker: float = Field(1.0, gt=0, allow_inf_nan=False, description="CPUs each actor reserves.")
