"""A trained causal LM on disk: how the policy and RL stages save it (merged weights, a LoRA adapter, or both) and
how later stages and exports read it back, rebuilding the merged model of an adapter-only run once into the model
cache. Loading one to train is tasks/models/loading.py's ``load_policy_model``."""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from creditflow.storage.hashing import sha256_file, sha256_json
from creditflow.tasks.configs import LoraConfig
from creditflow.tasks.models.loading import from_pretrained, load_tokenizer
from creditflow.tasks.models.model_card import merged_card_text
from creditflow.tasks.models.resolve import build_cached_folder, model_cache_dir, model_fingerprint, resolve_model

MERGED, ADAPTER = "model", "adapter"  # a trained artifact's folders: merged weights, LoRA adapter


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

    tokenizer = load_tokenizer(str(tokenizer_dir), trust_remote_code)
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
