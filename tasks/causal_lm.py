"""A causal LM ready to train: fp32 master weights (bf16 frozen base under LoRA on CUDA), dropout off, the KV cache
off, optional activation checkpointing and LoRA adapters. Shared by the preference (policy) and online-RL stages."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import torch

from creditflow.tasks.configs import LoraConfig
from creditflow.tasks.logprobs import check_lm_head
from creditflow.tasks.models import from_pretrained


class TrainableLMConfig(Protocol):
    bf16: bool
    gradient_checkpointing: bool
    lora: LoraConfig | None


def load_policy_model(
    model_dir: str | Path, config: TrainableLMConfig, device: torch.device, trust_remote_code: bool = False
):
    """(trained model, causal LM inside it): the same object, or a PEFT wrapper and the LM it patched."""
    from transformers import AutoModelForCausalLM

    # bf16 on CUDA: autocast over fp32 master weights. Pure bf16 weights would be ~13% faster and ~6 GiB lighter at
    # 0.5B params (docs/gpu_notes.md), but DPO learning rates (1e-7..1e-6) are far below bf16's relative precision
    # (2^-8), so most updates would round away. Frozen LoRA bases hold no updates and load in bf16.
    cuda_bf16 = config.bf16 and device.type == "cuda"
    dtype = torch.bfloat16 if cuda_bf16 and config.lora else torch.float32
    lm = from_pretrained(AutoModelForCausalLM, model_dir, trust_remote_code, dtype=dtype, attn_implementation="sdpa")
    lm = lm.to(device)
    check_lm_head(lm)
    lm.config.use_cache = False
    disable_dropout(lm)
    if config.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is None:
        return lm.train(), lm
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adapters = PeftLoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(lm, adapters)  # adapters are fp32 even on a bf16 base (autocast_adapter_dtype)
    return model.train(), model.get_base_model()


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the policy's own layers, as TRL's ``disable_dropout``: with it on, log π(y) of the very first
    step already differs from the reference's, and the DPO margin starts away from 0. LoRA adapters added after
    this keep their configured ``lora.dropout``."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention kernels read a float
            module.attention_dropout = 0.0


def save_trained_lm(
    model,
    lora: bool,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    adapter_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> None:
    """The trained model (LoRA merged) and its tokenizer as safetensors, and with ``adapter_dir`` (LoRA runs) the
    PEFT adapter alone: ``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained`` on the base model."""
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, tokenizer_dir, trust_remote_code)
    if lora and adapter_dir is not None:
        model.save_pretrained(str(adapter_dir), safe_serialization=True)  # before merging changes the model
        tokenizer.save_pretrained(str(adapter_dir))
    merged = model.merge_and_unload() if lora else model
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
