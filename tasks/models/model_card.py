"""Hugging Face model cards for the models the stages train: ``README.md`` with YAML metadata, so an exported folder
says what it is (base model, data, method, knobs, headline metrics and the creditflow config that made it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from creditflow.tasks.models.hub import is_hub_id

if TYPE_CHECKING:
    from creditflow.tasks.stage import StageContext


def card_text(
    *,
    title: str,
    summary: str,
    base_model: str,
    datasets: list[str],
    tags: list[str],
    metadata: dict[str, Any],
    metrics: dict[str, float],
    config: dict[str, Any],
    library_name: str = "transformers",
    pipeline_tag: str = "text-generation",
) -> str:
    """The README.md text. ``base_model`` is recorded in the metadata only when it is a hub id (the Hub links it);
    a local folder or bundled name goes under ``creditflow`` instead."""
    front: dict[str, Any] = {"library_name": library_name, "pipeline_tag": pipeline_tag, "tags": ["creditflow", *tags]}
    if is_hub_id(base_model):
        front["base_model"] = base_model.partition("@")[0]
    hub_datasets = [d.partition("@")[0] for d in datasets if is_hub_id(d)]
    if hub_datasets:
        front["datasets"] = hub_datasets
    front["creditflow"] = {"base_model": base_model, "datasets": datasets, **metadata}
    rounded = {k: round(float(v), 6) for k, v in metrics.items()}
    # The Hub's model-index needs a dataset per result: the hub dataset when it is the only source, else the
    # curated artifact's digest (what the metrics were measured on).
    sources = [d for d in datasets if not d.startswith("creditflow:")]
    digest = next((d for d in datasets if d.startswith("creditflow:")), "creditflow:unrecorded")
    repo, _, revision = (sources[0] if len(sources) == 1 and is_hub_id(sources[0]) else digest).partition("@")
    dataset = {"type": repo, "name": repo, **({"revision": revision} if revision else {})}
    front["model-index"] = [
        {
            "name": title,
            "results": [
                {
                    "task": {"type": pipeline_tag},
                    "dataset": dataset,
                    "metrics": [{"type": k, "name": k, "value": v} for k, v in rounded.items()],
                }
            ],
        }
    ]
    table = "\n".join(f"| {k} | {v:.4g} |" for k, v in rounded.items())
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {title}\n\n{summary}\n\n"
        f"Base model: `{base_model}`. Data: {', '.join(f'`{d}`' for d in datasets) or 'none recorded'}.\n\n"
        f"## Metrics\n\n| metric | value |\n|---|---|\n{table}\n\n"
        f"## CreditFlow config\n\nThe stage's config and those of the artifacts it read:\n\n"
        f"```yaml\n{yaml.safe_dump(config, sort_keys=False)}```\n"
    )


def stage_datasets(ctx: StageContext) -> list[str]:
    """What the model was trained on: the curated sources (hub ids stay ids) and the curate artifact's digest."""
    curate = ctx.upstream.get("curate")
    if curate is None:
        return []
    labels = []
    for source in curate.config.get("sources", []):
        if source.get("hf"):
            revision = f"@{source['revision']}" if source.get("revision") else ""
            labels.append(source["hf"] + revision)
        else:
            labels.append(f"file:{source['path']}" if source.get("path") else f"builtin:{source.get('builtin')}")
    return [*labels, f"creditflow:curate/{curate.fingerprint}"]


def stage_config(ctx: StageContext) -> dict[str, Any]:
    """This stage's config and its direct upstream artifacts' configs, keyed by stage."""
    upstream = {name: manifest.config for name, manifest in sorted(ctx.upstream.items())}
    return {ctx.stage: ctx.config.model_dump(mode="json"), "upstream": upstream}


def write_card(folder: str | Path, **card: Any) -> None:
    Path(folder, "README.md").write_text(card_text(**card))


ADAPTER_TITLE = " (LoRA adapter)"


def merged_card_text(adapter_card: str) -> str:
    """The card of a model merged later from an adapter-only run (``lora.save_merged: false``): the adapter's card,
    which holds everything the stage knew, with the merged model's title and library."""
    _, front, body = adapter_card.split("---\n", 2)
    meta = yaml.safe_load(front)
    meta["library_name"] = "transformers"
    for entry in meta["model-index"]:
        entry["name"] = entry["name"].removesuffix(ADAPTER_TITLE)
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body.replace(ADAPTER_TITLE, '', 1)}"


TIMINGS = ("tokens_per_s", "peak_memory_gb")  # metrics that vary run to run: kept out of cards (and digests)


def write_trained_cards(
    ctx: StageContext,
    folders: list[Path],
    *,
    base_model: str,
    title: str,
    tags: list[str],
    metadata: dict[str, Any],
    metrics: dict[str, float],
) -> None:
    """Cards for the folders a trained causal LM was saved to: merged ``model/`` and/or LoRA ``adapter/``; the adapter
    also names its base by hub id when it has one (PEFT records the local snapshot path it was loaded from)."""
    lora = getattr(ctx.config, "lora", None) is not None
    for folder in folders:
        adapter = folder.name == "adapter"
        if adapter and is_hub_id(base_model):
            repo, _, revision = base_model.partition("@")
            adapter_config = json.loads((folder / "adapter_config.json").read_text())
            adapter_config.update(base_model_name_or_path=repo, revision=revision or None)
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        write_card(
            folder,
            title=title + (ADAPTER_TITLE if adapter else ""),
            summary=f"Trained with CreditFlow's {ctx.stage} stage from its reference model.",
            base_model=base_model,
            datasets=stage_datasets(ctx),
            tags=[*tags, *(["lora", "peft"] if lora else [])],
            metadata=metadata,
            metrics={k: v for k, v in metrics.items() if k not in TIMINGS},
            config=stage_config(ctx),
            library_name="peft" if adapter else "transformers",
        )
