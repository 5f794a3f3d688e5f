"""Every load of a model or tokenizer from a folder, in one place: what each use needs of it (dtype, attention
kernel, eval or train mode, dropout, pad token, LoRA adapters) is decided here, not at the call sites.

| loader | for |
|---|---|
| ``load_policy_model`` | the policy and RL trainers: fp32 master weights (bf16 frozen LoRA bases on CUDA), no dropout |
| ``load_reference_model`` | the frozen reference for contrastive scoring, the audit and DPO-implicit rewards |
| ``load_generation_model`` | sampling: bf16 on CUDA, fp32 on CPU, eval mode, a pad token |
| ``load_reward_model`` | a 1-logit sequence classifier (reward model training, scoring, RL rewards) |
| ``load_abc_model`` | the reward model with eager attention, which returns the weights ABC reads |
| ``load_tokenizer`` | a tokenizer, cached per process |

All go through :func:`from_pretrained`, which honours the pipeline's ``trust_remote_code``.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from creditflow.tasks.config_base import precision_mode
from creditflow.tasks.configs import LoraConfig
from creditflow.tasks.models.logprobs import check_lm_head
from creditflow.tasks.models.precision import Precision, compute_precision, inference_dtype, resolve_device


def from_pretrained(auto_class, folder: str | Path, trust_remote_code: bool = False, **kwargs):
    """``auto_class.from_pretrained(folder, **kwargs)`` for a user's model, tokenizer or config. The folder's own
    Python files (``auto_map`` in its config) run only with the pipeline's ``trust_remote_code: true``; passing False,
    not None, also keeps transformers from asking on stdin. Its refusal gains a line naming that config key."""
    try:
        return auto_class.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise ValueError(
            f"{exc}\n{folder} ships its own modelling code: set `trust_remote_code: true` in the pipeline config to "
            "let transformers run it (only for a model you trust)"
        ) from exc


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return from_pretrained(AutoTokenizer, name_or_path, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc


class TrainableLMConfig(Protocol):
    bf16: bool
    gradient_checkpointing: bool
    lora: LoraConfig | None


def load_policy_model(
    model_dir: str | Path,
    config: TrainableLMConfig,
    device: torch.device,
    trust_remote_code: bool = False,
    precision: Precision | None = None,
    attention: str = "sdpa",
):
    """(trained model, causal LM inside it): the same object, or a PEFT wrapper and the LM it patched.
    ``precision``: default, the config's on ``device`` (tasks/models/precision.py); ``attention``: the kernel
    (packed rows need one that reads sequence boundaries, tasks/models/packing.py)."""

    # bf16 on CUDA: autocast over fp32 master weights. Pure bf16 weights would be ~13% faster and ~6 GiB lighter at
    # 0.5B params (docs/gpu_notes.md), but DPO learning rates (1e-7..1e-6) are far below bf16's relative precision
    # (2^-8), so most updates would round away. Frozen LoRA bases hold no updates and load in bf16; FSDP2 keeps fp32
    # masters and computes with bf16 copies of them.
    precision = precision or compute_precision(precision_mode(config), device)
    dtype = precision.weights if config.lora else torch.float32
    lm = from_pretrained(AutoModelForCausalLM, model_dir, trust_remote_code, dtype=dtype, attn_implementation=attention)
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
        # Functional dropout reads a float the layer copied from its config at init: OPT's `dropout` and
        # `activation_dropout`, Llama's `attention_dropout`, BERT-style `hidden_dropout_prob`.
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in vars(config).items() if config is not None else ():
        if "dropout" in name and isinstance(value, float):  # and layers that read the config at forward time
            setattr(config, name, 0.0)


def load_reference_model(folder: str | Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    model = from_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    check_lm_head(model)
    return model


def load_generation_tokenizer(folder: str | Path, trust_remote_code: bool = False):
    """The tokenizer in ``folder``, with EOS as its pad token when it has none (generate() pads batches)."""

    tokenizer = from_pretrained(AutoTokenizer, folder, trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_generation_model(folder: str | Path, device: str = "auto", trust_remote_code: bool = False):
    """(tokenizer, causal LM) for generation: bf16 on CUDA, fp32 on CPU, eval mode, a pad token set."""

    target = resolve_device(device)
    tokenizer = load_generation_tokenizer(folder, trust_remote_code)
    model = from_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=inference_dtype("auto", target))
    return tokenizer, model.to(target).eval()


def ensure_pad(tokenizer, model) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder classifiers find the read-out token through the pad id; it must be set on the config.
    model.config.pad_token_id = tokenizer.pad_token_id


def load_reward_model(
    folder: str | Path, device: torch.device | None = None, trust_remote_code: bool = False, **kwargs
):
    """(tokenizer, sequence classifier) in eval mode; ``kwargs`` go to ``from_pretrained``. A backbone gets a fresh
    1-logit head; a reward model (a sequence classifier already, or custom code such as ArmoRM's) keeps its own."""

    tokenizer = from_pretrained(AutoTokenizer, folder, trust_remote_code)
    config = from_pretrained(AutoConfig, folder, trust_remote_code)
    classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    custom = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    head = {} if classifier or custom else {"num_labels": 1}
    model = from_pretrained(AutoModelForSequenceClassification, folder, trust_remote_code, **head, **kwargs)
    ensure_pad(tokenizer, model)
    return tokenizer, model.to(device or resolve_device()).eval()


def load_abc_model(folder: str | Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """(tokenizer, reward model) with eager attention: SDPA returns no attention weights."""
    return load_reward_model(folder, device, trust_remote_code, dtype=dtype, attn_implementation="eager")
