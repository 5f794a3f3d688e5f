"""``creditflow export``: copy a trained model out of the artifact store as a self-contained Hugging Face folder
(weights, tokenizer and model card), loadable with ``from_pretrained`` without CreditFlow or the workspace."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from creditflow.storage.catalog import Catalog
from creditflow.storage.workspace import Workspace
from creditflow.tasks.models.causal_lm import ADAPTER, trained_model_folder
from creditflow.tasks.models.resolve import resolve_model


def export_model(ws: Workspace, stage: str, out: str | Path, run_id: str | None = None, adapter: bool = False) -> Path:
    """Copy ``model/`` (or with ``adapter`` the LoRA ``adapter/``) of the newest artifact of ``stage``, or of the
    run ``run_id``, to ``out``; an adapter-only LoRA artifact's merged model is rebuilt from its base first. The copy
    lands under a temporary name and is renamed into place, so ``out`` is either complete or absent; an existing
    non-empty ``out`` is refused, never overwritten."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export: {out} exists and is not an empty folder; choose another --out")
    fingerprints = Catalog(ws.catalog_path, ws.store).stage_fingerprints(stage, run_id)
    which = f"run {run_id!r}" if run_id else f"workspace {ws.root}"
    if not fingerprints:
        raise ValueError(f"export: no {stage} stage run in {which} (`creditflow runs` lists them)")
    present = [f for f in fingerprints if ws.store.exists(stage, f)]
    if not present:
        raise ValueError(f"export: the {stage} artifacts of {which} were garbage-collected; rerun the stage")

    artifact = ws.store.path(stage, present[0])
    if (artifact / "pretrained.json").is_file():
        raise ValueError(
            f"export: the {stage} artifact {present[0]} evaluated a pretrained reward model "
            f"({json.loads((artifact / 'pretrained.json').read_text())['pretrained']}); nothing was trained to export"
        )
    if adapter and not (artifact / ADAPTER).is_dir():
        raise ValueError(
            f"export: the {stage} artifact {present[0]} has no {ADAPTER}/ folder (a LoRA run with "
            "lora.save_adapter: true writes one)"
        )
    try:
        source = artifact / ADAPTER if adapter else trained_model_folder(artifact)
    except ValueError as exc:
        raise ValueError(f"export: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def newest_systems(ws: Workspace, trust_remote_code: bool = False) -> dict[str, Path]:
    """The workspace's newest trained policy (``policy``), RL policy (``rl``) and the reference they started from
    (``reference``): what ``creditflow generations`` answers with by default."""
    systems: dict[str, Path] = {}
    newest = {}
    for stage in ("policy", "rl"):
        found = sorted(ws.store.manifests(stage), key=lambda m: m.created_at)
        if found:
            newest[stage] = found[-1]
            systems[stage] = trained_model_folder(ws.store.path(stage, found[-1].fingerprint), trust_remote_code)
    if "policy" not in newest:
        raise ValueError(f"no trained policy in {ws.root}: run the pipeline first, or name models with --model")
    upstream = newest["policy"].inputs["upstream"]["token_rewards"]
    token_rewards = ws.store.find_by_digest("token_rewards", upstream)
    systems["reference"] = resolve_model(token_rewards.config["reference_model"])
    return systems
