"""``creditflow rewards``: look at token rewards, and audit whether they point the right way."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from creditflow.flows.cli_common import WorkspaceOpt, user_errors
from creditflow.flows.render import console, print_audit, print_reward_bench

rewards_app = typer.Typer(help="Token-level rewards.", no_args_is_help=True)


@rewards_app.command("audit")
def rewards_audit(
    model: str = typer.Option("smollm2", "--model", help="Reference model: a folder or a named model."),
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="Template presets to audit (default: all)."),
    per_kind: int = typer.Option(40, help="Planted-error items per kind (arithmetic, counting, ordering, units)."),
    sentiment: int = typer.Option(60, help="Sentiment-flip items from the bundled task."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="Your JSONL: prompt, response, bad_spans."),
    seed: int = typer.Option(0, help="Probe seed."),
    reward_model: Optional[str] = typer.Option(None, help="A reward-model folder: audit ABC too."),
    policy: Optional[str] = typer.Option(None, help="A trained policy folder: audit its DPO-implicit reward."),
    max_length: int = typer.Option(512, help="Prompt + response tokens."),
    workspace: Optional[str] = WorkspaceOpt,
    experiment: str = typer.Option("creditflow-audit", help="MLflow experiment of the audit run."),
) -> None:
    """Do token rewards point the right way? The paired score of planted errors (wrong token vs right token at the
    same place), and the pooled AUC of bad vs other tokens, on a probe with known errors."""
    from creditflow.tasks.configs import TEMPLATE_PRESETS
    from creditflow.tasks.credit.audit_probes import build_probe
    from creditflow.tasks.models.resolve import resolve_model
    from creditflow.tasks.recipes import audit

    with user_errors():
        unknown = sorted(set(preset or []) - set(TEMPLATE_PRESETS))
        if unknown:
            raise ValueError(f"--preset {unknown[0]!r}: presets are {', '.join(TEMPLATE_PRESETS)}")
        items = build_probe(per_kind, sentiment, seed, probe)
        presets = {name: TEMPLATE_PRESETS[name] for name in (preset or TEMPLATE_PRESETS)}
        extra = {
            "reward_model": reward_model and resolve_model(reward_model),
            "policy": policy and resolve_model(policy),
        }
        console.print(f"auditing {len(items)} probe items on {model} ...")
        rows = audit.run_audit(resolve_model(model), presets, items, max_length=max_length, **extra)
    print_audit(rows)
    from creditflow.storage.tracking import Run
    from creditflow.storage.workspace import Workspace

    run = Run.start(Workspace.resolve(workspace), experiment, f"audit {model}", tags={"creditflow.kind": "audit"})
    run.log_params({"model": model, "presets": ",".join(presets), "items": len(items), "seed": seed})
    run.log_metrics({f"{r.source}.{r.kind}.{key}": getattr(r, key) for r in rows for key in ("paired", "auc")})
    run.log_rows([vars(r) for r in rows], "audit/table.json")
    run.log_figure(audit.audit_figure(rows), "audit/paired.png")
    run.end()
    console.print(f"logged to MLflow experiment {experiment!r}, run {run.run_id}")


@rewards_app.command("show")
def rewards_show(
    pair_id: str = typer.Argument(..., help="pair_id from curate_pairs / token_rewards_token_rewards"),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Print one pair's token rewards, each token coloured by r (green good, red bad), from the newest artifact."""
    from creditflow.storage.workspace import Workspace
    from creditflow.tasks.credit.token_view import render_pair
    from creditflow.tasks.models.loading import load_tokenizer
    from creditflow.tasks.models.resolve import resolve_model
    from creditflow.tasks.stage import reward_model_location

    store = Workspace.resolve(workspace).store
    for manifest in sorted(store.manifests("token_rewards"), key=lambda m: m.created_at, reverse=True):
        table = store.read_table(manifest, "token_rewards")
        rows = [r for r in table.to_pylist() if r["pair_id"] == pair_id]
        if rows:
            tokenizers = {"contrastive": load_tokenizer(str(resolve_model(manifest.config["reference_model"])))}
            if any(r["source"] == "abc" for r in rows):
                rm = store.load("reward_model", _upstream_fingerprint(store, "reward_model", manifest))
                tokenizers["abc"] = load_tokenizer(str(reward_model_location(store, rm)))
            console.print(render_pair(pair_id, rows, tokenizers))
            return
    with user_errors():
        raise KeyError(f"no token rewards for pair {pair_id!r} in {store.root}")


def _upstream_fingerprint(store, stage: str, manifest) -> str:
    return store.find_by_digest(stage, manifest.inputs["upstream"][stage]).fingerprint


@rewards_app.command("bench")
def rewards_bench(
    file: str = typer.Argument(
        ..., help="RewardBench-style rows: prompt, chosen, rejected[, subset]; a path or hub id."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="A reward model: a folder or hub id. Default: the workspace's newest reward_model stage."
    ),
    max_length: int = typer.Option(512, help="Prompt + response tokens."),
    batch_size: int = typer.Option(16, help="Rows per forward."),
    trust_remote_code: bool = typer.Option(False, help="Let a custom-code reward model (ArmoRM) run its own code."),
    workspace: Optional[str] = WorkspaceOpt,
    experiment: str = typer.Option("creditflow-rewardbench", help="MLflow experiment of the run."),
) -> None:
    """Reward-model accuracy per subset on a RewardBench-style file (chosen scored above rejected; ties half)."""
    from creditflow.storage.tracking import Run
    from creditflow.storage.workspace import Workspace
    from creditflow.tasks.configs import SourceConfig
    from creditflow.tasks.infer.reward_bench import reward_bench
    from creditflow.tasks.models.resolve import resolve_model
    from creditflow.tasks.stage import reward_model_location

    ws = Workspace.resolve(workspace)
    with user_errors():
        if model is None:
            found = sorted(ws.store.manifests("reward_model"), key=lambda m: m.created_at)
            if not found:
                raise ValueError(f"no reward_model stage in {ws.root}: pass --model")
            folder, label = reward_model_location(ws.store, found[-1]), f"reward_model/{found[-1].fingerprint}"
        else:
            folder, label = resolve_model(model), model
        path = Path(file).expanduser()
        source = SourceConfig(path=str(path)) if path.exists() else SourceConfig(hf=file)
        report = reward_bench(folder, source, max_length, batch_size, trust_remote_code)
    print_reward_bench(label, report)
    run = Run.start(ws, experiment, f"rewardbench {label}", tags={"creditflow.kind": "rewardbench"})
    run.log_params({"model": label, "file": file, "max_length": max_length})
    run.log_metrics({f"accuracy.{r.subset}": r.accuracy for r in report})
    run.log_rows([vars(r) for r in report], "rewardbench/subsets.json")
    run.end()
    console.print(f"logged to MLflow experiment {experiment!r}, run {run.run_id}")
