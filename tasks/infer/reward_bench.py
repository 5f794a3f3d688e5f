"""Reward-model accuracy on a RewardBench-style file: per subset, the share of rows whose chosen answer scores above
the rejected one (ties half), for a trained or a pretrained reward model alike.

A row has ``prompt``, ``chosen``, ``rejected`` (strings, or chat messages) and optionally ``subset`` (RewardBench's
column; rows without one count under ``all``). The file is read like a curation source (JSONL, JSON, Parquet, CSV,
compressed or sharded, or a hub dataset), and a bad row is an error naming the file, line and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.ingest import read_rows
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.infer.judging import outcomes
from creditflow.tasks.infer.reward_scoring import RewardScorer


@dataclass
class BenchRow:
    prompt: Messages
    chosen: Messages
    rejected: Messages
    subset: str


@dataclass
class SubsetAccuracy:
    subset: str
    rows: int
    accuracy: float  # chosen scored above rejected; ties count half
    mean_margin: float  # mean of r(chosen) - r(rejected)


def _messages(value: Any, role: str, where: str) -> Messages:
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": m.get("role", role), "content": str(m["content"])} for m in value]
    raise ValueError(f"{where}: expected a non-empty string or a list of chat messages, got {type(value).__name__}")


def read_bench(source: SourceConfig) -> list[BenchRow]:
    columns, rows = read_rows(source)
    missing = {"prompt", "chosen", "rejected"} - set(columns)
    if missing:
        raise ValueError(f"{source.label}: no {', '.join(sorted(missing))} column (found {', '.join(columns)})")
    out = []
    for location, row in rows:
        where = f"{source.label} {location}"
        lacking = [key for key in ("prompt", "chosen", "rejected") if key not in row]
        if lacking:  # a JSON row lacking what most rows have
            raise ValueError(f"{where}: no field {lacking[0]!r}")
        prompt = _messages(row["prompt"], "user", f"{where}, field 'prompt'")
        chosen, rejected = (_messages(row[k], "assistant", f"{where}, field {k!r}") for k in ("chosen", "rejected"))
        out.append(BenchRow(prompt, chosen, rejected, str(row.get("subset") or "all")))
    if not out:
        raise ValueError(f"{source.label}: no rows")
    return out


def reward_bench(
    folder: str | Path, source: SourceConfig, max_length: int = 512, batch_size: int = 16, trust_remote_code=False
) -> list[SubsetAccuracy]:
    """Accuracy per subset, in the file's order of first appearance, then ``overall`` over every row."""
    rows = read_bench(source)
    scorer = RewardScorer(folder, max_length, batch_size, trust_remote_code=trust_remote_code)
    prompts = [r.prompt for r in rows]
    chosen, rejected = (
        scorer.score(prompts, [r.chosen for r in rows]),
        scorer.score(prompts, [r.rejected for r in rows]),
    )
    results = outcomes(chosen, rejected)
    subsets = list(dict.fromkeys(r.subset for r in rows))
    report = []
    for subset in [*subsets, "overall"]:
        picked = [i for i, r in enumerate(rows) if subset in (r.subset, "overall")]
        report.append(
            SubsetAccuracy(
                subset,
                len(picked),
                sum(results[i] for i in picked) / len(picked),
                sum(chosen[i] - rejected[i] for i in picked) / len(picked),
            )
        )
    return report
