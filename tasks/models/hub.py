"""Hugging Face Hub ids: what counts as one, and the snapshot folder of one in the HF cache (downloaded unless
HF_HUB_OFFLINE=1). Data sources (tasks/data/ingest.py) and model specs (tasks/models/resolve.py) both use it."""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

NAMED_MODELS = ("smollm2", "minilm", "tiny-lm")


# What from_pretrained reads from a hub model repo: configs and tokenizer files, chat templates, custom code, the
# card and safetensors weights; not the other formats many repos also carry (original/*.pth, ONNX, GGUF, flax:
# 16 GB more for Llama-3-8B-Instruct). PyTorch pickles only when a repo has no safetensors.
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py", "*.md"]


HUB_PICKLE_WEIGHTS = ["pytorch_model*.bin"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str | Path) -> bool:
    """``org/name`` or ``org/name@revision`` that is not an existing folder or a named model."""
    return str(spec) not in NAMED_MODELS and bool(_HUB_ID.match(str(spec))) and not Path(spec).expanduser().is_dir()


def hub_snapshot(spec: str, repo_type: str = "model") -> Path:
    """The cached snapshot folder of hub id ``org/name[@revision]`` (a model, or with ``repo_type="dataset"`` a
    dataset repo); downloaded first unless HF_HUB_OFFLINE=1, a model repo only as far as ``from_pretrained`` reads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = spec.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    # Read at call time (huggingface_hub reads them once, at import): a test or a user may set them late.
    cache = os.environ.get("HF_HUB_CACHE") or (os.environ.get("HF_HOME") and str(Path(os.environ["HF_HOME"]) / "hub"))
    download = partial(snapshot_download, repo, repo_type=repo_type, cache_dir=cache or None, local_files_only=offline)
    patterns = HUB_MODEL_FILES if repo_type == "model" else None  # a dataset repo's files are all data
    try:
        folder = Path(download(revision=revision or None, allow_patterns=patterns))
        if patterns and not any(folder.glob("*.safetensors")):
            # A repo with PyTorch pickles only: fetch those from the same commit (offline: found in the cache).
            folder = Path(download(revision=folder.name, allow_patterns=HUB_PICKLE_WEIGHTS))
    except LocalEntryNotFoundError:
        raise ValueError(
            f"hub {repo_type} {spec!r} is not in the Hugging Face cache ({cache or 'the default HF cache'}) and "
            "HF_HUB_OFFLINE=1: download it once with HF_HUB_OFFLINE=0 (`hf auth login` first for gated models), "
            "or check the revision"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ValueError(
            f"hub {repo_type} {spec!r}: {str(exc).splitlines()[0]} (check the id and revision; gated models need "
            "`hf auth login`)"
        ) from None
    return folder
