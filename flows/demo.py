"""``creditflow demo``: the pipeline once per method (DPO, DPO + T-REG) and seed, then one comparison table.

Every variant is an ordinary pipeline run (its own MLflow parent run, named ``demo <method> seed=<s>``) that differs
only in ``policy.loss.alpha`` and ``policy.seed``, so curation, the reward model, on-policy sampling and token
rewards are computed once and served from the cache to the other variants. ``configs/demo.yaml`` (SmolLM2 +
MiniLM) needs the model packages; without them, or with ``tiny=True``, ``configs/demo_tiny.yaml`` runs every stage
on tiny models instead.
"""

from __future__ import annotations

import importlib.resources
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from creditflow.flows.config import load_config
from creditflow.tasks.models.resolve import missing_packages

DEMO_CONFIG = "demo.yaml"
TINY_CONFIG = "demo_tiny.yaml"
DEMO_MODELS = ("smollm2", "minilm")


def config_path(name: str) -> Path:
    return Path(str(importlib.resources.files("creditflow.configs") / name))


@dataclass
class DemoPlan:
    config: Path
    fallback_reason: str | None  # why the tiny config replaced the real one; None when it did not


def plan_demo(tiny: bool) -> DemoPlan:
    if tiny:
        return DemoPlan(config_path(TINY_CONFIG), None)
    missing = [dist for spec in DEMO_MODELS for dist in missing_packages(spec)]
    if missing:
        reason = f"{', '.join(missing)} not installed, so the demo runs on tiny models instead (see `make install`)"
        return DemoPlan(config_path(TINY_CONFIG), reason)
    return DemoPlan(config_path(DEMO_CONFIG), None)


# Method -> (run-name label, overrides). T-REG with ABC token rewards needs the ABC rows computed too; the
# contrastive rows come from the shard cache, so that costs one reward-model pass.
METHODS = {
    "dpo": ("dpo", {}),
    "t-reg": ("dpo+t-reg", {}),
    "t-reg-abc": (
        "dpo+t-reg-abc",
        {"policy.token_reward_source": "abc", "token_rewards.sources": ["contrastive", "abc"]},
    ),
}
DEFAULT_METHODS = ("dpo", "t-reg")


def variants(seeds: list[int], alpha: float, methods=DEFAULT_METHODS) -> list[tuple[str, dict[str, Any]]]:
    """(MLflow run name, config overrides) per variant; seeds outermost so a cut-short run still compares methods."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--method {unknown[0]!r}: methods are {', '.join(METHODS)}")
    return [
        (
            f"demo {METHODS[method][0]} seed={seed}",
            {"policy.loss.alpha": 0.0 if method == "dpo" else alpha, "policy.seed": seed, **METHODS[method][1]},
        )
        for seed in seeds
        for method in methods
    ]


def run_demo(
    plan: DemoPlan,
    workspace: str | None,
    seeds: list[int],
    alpha: float,
    progress: bool = True,
    methods=DEFAULT_METHODS,
) -> list[dict[str, Any]]:
    """Run every variant; return the pipeline results (``pipeline_flow``'s dicts) in order."""
    from creditflow.flows.pipeline import run_pipeline

    if alpha <= 0:
        raise ValueError(f"--alpha must be > 0 (the T-REG variant's weight), got {alpha}")
    results = []
    for run_name, overrides in variants(seeds, alpha, methods):
        config = load_config(plan.config, overrides).model_dump(mode="json")
        results.append(run_pipeline(config=config, workspace=workspace, progress=progress, run_name=run_name))
    return results


def comparison_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant plus the reference policy's row, from the evaluate stages' metrics."""
    from creditflow.tasks.configs import method_label

    rows = []
    for result in results:
        metrics = result["stages"]["evaluate"]["manifest"]["metrics"]
        policy = result["stages"]["policy"]["manifest"]["config"]
        rows.append(
            {
                "method": method_label(policy),
                "seed": policy["seed"],
                "gold": metrics.get("gold_score.policy"),
                "rm": metrics["rm_score.policy"],
                "win_gold": metrics.get("win_rate_gold"),
                "lc_win_gold": metrics.get("lc_win_rate_gold"),
                "win_rm": metrics["win_rate_rm"],
                "lc_win_rm": metrics.get("lc_win_rate_rm"),
                "token_corr": metrics.get("token_reward_correlation"),
                "prompts": metrics["prompts"],
            }
        )
    # Every variant evaluates the same reference with the same prompts and seed, so any one of them has its scores.
    metrics = results[0]["stages"]["evaluate"]["manifest"]["metrics"]
    reference = {
        "method": "reference (no training)",
        "seed": None,
        "gold": metrics.get("gold_score.reference"),
        "rm": metrics["rm_score.reference"],
        "win_gold": None,  # the baseline the win rates are measured against
        "lc_win_gold": None,
        "win_rm": None,
        "lc_win_rm": None,
        "token_corr": None,
        "prompts": metrics["prompts"],
    }
    return [reference, *rows]


WIN_RATES = ("win_gold", "lc_win_gold", "win_rm", "lc_win_rm")


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per method (the reference row once), for two or more seeds."""

    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = []
    for method, group in by_method.items():
        entry = {"method": method, "seeds": len(group) if group[0]["seed"] is not None else None}
        for key in ("gold", "rm", *WIN_RATES, "token_corr"):
            values = [r[key] for r in group if r[key] is not None]
            entry[key] = (
                (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
            )
        summary.append(entry)
    return summary
