"""A causal LM ready to train: fp32 master weights (bf16 frozen base under LoRA on CUDA), dropout off, the KV cache
off, optional activation checkpointing and LoRA adapters; how the trained model is saved and read back. Shared by
the preference (policy) and online-RL stages and by the stages and exports that read their models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Protocol

import torch
from filelock import FileLock
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from creditflow.storage.hashing import sha256_file, sha256_json
from creditflow.tasks.configs import LoraConfig
from creditflow.tasks.models.logprobs import check_lm_head
from creditflow.tasks.models.model_card import merged_card_text
from creditflow.tasks.models.resolve import (
    build_cached_folder,
    from_pretrained,
    model_cache_dir,
    model_fingerprint,
    resolve_model,
)

MERGED, ADAPTER = "model", "adapter"  # a trained artifact's folders: merged weights, LoRA adapter


class TrainableLMConfig(Protocol):
    bf16: bool
    gradient_checkpointing: bool
    lora: LoraConfig | None


def load_policy_model(
    model_dir: str | Path, config: TrainableLMConfig, device: torch.device, trust_remote_code: bool = False
):
    """(trained model, causal LM inside it): the same object, or a PEFT wrapper and the LM it patched."""

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


def trained_outputs(artifact_dir: Path, lora: LoraConfig | None) -> tuple[Path | None, Path | None]:
    """Where a trained causal LM goes in its artifact: (merged ``model/`` or None, LoRA ``adapter/`` or None)."""
    merged = lora is None or lora.save_merged
    adapter = lora is not None and lora.save_adapter
    return artifact_dir / MERGED if merged else None, artifact_dir / ADAPTER if adapter else None


def save_trained_lm(
    model,
    lora: bool,
    tokenizer_dir: str | Path,
    out_dir: str | Path | None,
    adapter_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> None:
    """With ``out_dir``, the trained model (LoRA merged) and its tokenizer as safetensors; with ``adapter_dir`` (LoRA
    runs) the PEFT adapter alone and the tokenizer: ``adapter_config.json`` + ``adapter_model.safetensors``,
    loadable with ``PeftModel.from_pretrained`` on the base model."""

    tokenizer = from_pretrained(AutoTokenizer, tokenizer_dir, trust_remote_code)
    if lora and adapter_dir is not None:
        model.save_pretrained(str(adapter_dir), safe_serialization=True)  # before merging changes the model
        tokenizer.save_pretrained(str(adapter_dir))
    if out_dir is not None:
        merged = model.merge_and_unload() if lora else model
        merged.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))


def trained_model_folder(artifact_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """The merged model of a trained artifact (policy, rl): its ``model/``, or for an adapter-only LoRA run
    (``lora.save_merged: false``) its base + ``adapter/`` merged once into the model cache, keyed by the adapter's
    files and the base's weights, so every later stage and export shares that one copy."""
    artifact_dir = Path(artifact_dir)
    if (artifact_dir / MERGED).is_dir():
        return artifact_dir / MERGED
    adapter = artifact_dir / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{artifact_dir}: no {MERGED}/ folder, and no LoRA {ADAPTER}/ to rebuild it from")
    base = adapter_base(adapter)
    files = {p.name: sha256_file(p) for p in sorted(adapter.iterdir()) if p.is_file()}
    target = model_cache_dir() / f"merged-{sha256_json({'adapter': files, 'base': model_fingerprint(base)})[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.with_name(f".{target.name}.lock")):  # concurrent stages merge once
        if not target.is_dir():
            _merge_adapter(base, adapter, target, trust_remote_code)
    return target


def adapter_base(adapter_dir: Path) -> Path:
    """The local folder of a PEFT adapter's base model (its ``base_model_name_or_path`` and ``revision``)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    spec = config["base_model_name_or_path"] + (f"@{config['revision']}" if config.get("revision") else "")
    try:
        return resolve_model(spec)
    except ValueError as exc:
        raise ValueError(
            f"{adapter_dir}: cannot rebuild the merged model, its base model {spec!r} (base_model_name_or_path in "
            f"adapter_config.json) is gone: {exc}"
        ) from None


def _merge_adapter(base: Path, adapter: Path, target: Path, trust_remote_code: bool) -> None:
    """Base + adapter merged into ``target`` in the model cache, with the adapter's tokenizer and card."""

    # The base's own dtype, as a LoRA run on CUDA (bf16 frozen base) merges in the stage.
    lm = from_pretrained(AutoModelForCausalLM, base, trust_remote_code, dtype="auto")
    merged = PeftModel.from_pretrained(lm, str(adapter)).merge_and_unload()
    tokenizer = from_pretrained(AutoTokenizer, adapter, trust_remote_code)
    card = adapter / "README.md"

    def save(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if card.is_file():
            (tmp / "README.md").write_text(merged_card_text(card.read_text()))

    build_cached_folder(target, save)
