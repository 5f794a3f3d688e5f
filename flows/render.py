"""What the CLI prints: rich tables of stage results, the demo comparison, the servers, and where to look next."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Optional

from rich import box
from rich.console import Console
from rich.table import Table

console = Console()
LOCAL_UI = "http://127.0.0.1:5000"  # `creditflow ui`'s default address


def print_stages(result: dict[str, Any], title: str = "stages") -> None:
    table = Table(title=title, show_lines=False)
    for column in ("stage", "fingerprint", "cache", "rows", "mlflow run"):
        table.add_column(column)
    for name, stage in result["stages"].items():
        manifest = stage["manifest"]
        rows = ", ".join(f"{k}={v}" for k, v in manifest["row_counts"].items())
        table.add_row(
            name, manifest["fingerprint"], "hit" if stage["cache_hit"] else "computed", rows, stage["mlflow_run_id"]
        )
    console.print(table)


def print_results(result: dict[str, Any]) -> None:
    """The run's headline metrics, one row per stage that has some (the parent run carries the same numbers)."""
    from creditflow.flows.pipeline import HEADLINE_METRICS

    table = Table("stage", "metric", "value", title="results")
    for stage, names in HEADLINE_METRICS.items():
        metrics = result["stages"].get(stage, {}).get("manifest", {}).get("metrics", {})
        capabilities = [name for name in metrics if name.startswith("lm_eval.")] if stage == "evaluate" else []
        for name in [*names, *capabilities]:
            if name in metrics:
                table.add_row(stage, name, f"{metrics[name]:.4g}")
    console.print(table)


def experiment_link(base: str, experiment_id: str | None = None, view: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of every experiment), in the model-training view (MLflow 3's UI
    opens in its GenAI view unless the link says otherwise); ``view``: a saved runs view to open (its columns)."""
    page = f"#/experiments/{experiment_id}/runs" if experiment_id else "#/experiments"
    return f"{base}/{page}?workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")


def print_where_to_look(workspace: str, mlflow_run_id: str | None = None) -> None:
    """Where the run's outputs are; with ``mlflow_run_id``, a link straight to its experiment's runs."""
    ws = Path(workspace)
    say = partial(console.print, soft_wrap=True)  # commands and paths stay whole, to copy and paste
    say(f"\n[bold]workspace[/]  {ws}")
    experiment_id = view = None
    if mlflow_run_id:  # straight to the run's experiment, in its headline view when the pipeline saved one
        from creditflow.flows.pipeline import HEADLINE_VIEW
        from creditflow.storage.tracking import SAVED_VIEW_PREFIX, client_for
        from creditflow.storage.workspace import Workspace

        client = client_for(Workspace.resolve(str(ws)))
        experiment_id = client.get_run(mlflow_run_id).info.experiment_id
        if SAVED_VIEW_PREFIX + HEADLINE_VIEW in client.get_experiment(experiment_id).tags:
            view = HEADLINE_VIEW
    server = os.environ.get("MLFLOW_TRACKING_URI", "")
    if server.startswith("http"):
        say(f"[bold]MLflow[/]     {experiment_link(server.rstrip('/'), experiment_id, view)}")
    else:
        store = f"sqlite:///{ws / 'mlflow.db'}"
        say(f"[bold]MLflow[/]     creditflow ui -w {ws}   (or: mlflow ui --backend-store-uri {store})")
        say(f"           then open {experiment_link(LOCAL_UI, experiment_id, view)}")
    say(f'[bold]DuckDB[/]     creditflow sql -w {ws} "SELECT rule, count(*) FROM curate_quarantine GROUP BY rule"')
    say(f"           or: duckdb {ws / 'catalog.duckdb'}")


# The demo's tables: a label split at its parts, two-line headers, so they read whole in an 80-column terminal.
RESULT_COLUMNS = (
    ("gold", "gold\nscore", ".3f"),
    ("rm", "RM\nscore", ".3f"),
    ("win_gold", "win\ngold", ".2f"),
    ("lc_win_gold", "LC\ngold", ".2f"),
    ("win_rm", "win\nRM", ".2f"),
    ("lc_win_rm", "LC\nRM", ".2f"),
    ("token_corr", "token\ncorr", ".3f"),
)
RESULTS_NOTE = (
    "gold = vaderSentiment compound score of the answer (the sample task's judge); RM = the reward model; win: share "
    "of prompts where the policy's answer beats the reference's (ties half); LC: the win rate with the answers' "
    "length difference controlled for (AlpacaEval 2's GLM); token corr: token rewards vs the policy's implicit token "
    "rewards at the last training step."
)


def _results_table(title: str, methods: list[str], seed_column: bool) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    longest = max(len(line) for method in methods for line in method_cell(method).splitlines())
    table.add_column("method", overflow="fold", min_width=min(longest, 24))
    if seed_column:
        table.add_column("seed", justify="right", no_wrap=True)
    for _, header, _ in RESULT_COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    return table


def method_cell(label: str) -> str:
    """ "dpo + T-REG (contrastive, α=0.25)" on three short lines: dpo / + T-REG / (contrastive, α=0.25)."""
    return label.replace(" + ", "\n+ ").replace(" (", "\n(")


def print_comparison(rows: list[dict[str, Any]]) -> None:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    title = f"policy vs reference on {rows[0]['prompts']} held-out prompts (same sampling seed)"
    table = _results_table(title, [row["method"] for row in rows], seed_column=True)
    for row in rows:
        cells = [fmt(row.get(key), spec) for key, _, spec in RESULT_COLUMNS]
        table.add_row(method_cell(row["method"]), fmt(row["seed"], "d"), *cells, end_section=True)
    console.print(table)
    console.print(RESULTS_NOTE)


def print_summary(summary: list[dict[str, Any]]) -> None:
    """Mean ± standard deviation over seeds, per method."""

    def fmt(value, spec: str) -> str:
        return "-" if value is None else f"{value[0]:{spec}}\n±{value[1]:{spec}}"

    table = _results_table("mean ± std over seeds", [row["method"] for row in summary], seed_column=False)
    for row in summary:
        seeds = "" if row["seeds"] is None else f"\n{row['seeds']} seeds"
        cells = [fmt(row.get(key), spec) for key, _, spec in RESULT_COLUMNS]
        table.add_row(method_cell(row["method"]) + seeds, *cells, end_section=True)
    console.print(table)


def print_servers(workspace: Optional[str]) -> None:
    from creditflow.flows import ops

    table = Table("server", "pid", "url", "health", "log")
    for row in ops.status(workspace):
        health = "[green]ok[/]" if row["healthy"] else "[red]down[/]"
        table.add_row(row["server"], str(row["pid"] or "-"), row["url"] or "-", health, row["log"])
    console.print(table)


def print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    """Query results as CSV or JSON (one object per row) on stdout, for pipes and files."""

    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        records = [dict(zip(columns, map(_json_safe, row))) for row in rows]
        json.dump(records, sys.stdout, default=str, indent=1, allow_nan=False)
        sys.stdout.write("\n")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity (json.dump would write them anyway): null, also inside DuckDB lists and structs."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def print_runs(found: list[dict[str, Any]]) -> None:
    """``creditflow runs``: one block per run, so fingerprints stay whole in a narrow terminal."""
    for run in found:
        console.print(
            f"[bold]{run['name'] or run['run_id']}[/]  {run['status'] or '?'}  "
            f"finished {str(run['finished_at'])[:19]}  ({run['kind']} run {run['run_id']})"
        )
        for stage in run["stages"]:
            cache = "hit     " if stage["cache_hit"] else "computed"
            artifact = "" if stage["artifact"] else "  (artifact deleted)"
            console.print(f"  {stage['stage']:<14} {stage['fingerprint']}  {cache}{artifact}", highlight=False)
    if not found:
        console.print("no runs recorded in this workspace yet")


def print_gc(report, ws, dry_run: bool, min_age: float) -> None:
    """What ``creditflow artifacts gc`` removed (or would remove) and kept."""
    if report.refused:
        console.print(f"[yellow]{report.refused}[/]")
        return
    verb = "would remove" if dry_run else "removed"
    for stage_name, fingerprint, size in report.removed:
        console.print(f"{verb} {ws.store.path(stage_name, fingerprint)}  ({size:,} bytes)")
    for path, size in report.removed_files:
        console.print(f"{verb} {path}  ({size:,} bytes)")
    for stage_name, fingerprint in report.too_young:
        console.print(f"kept {stage_name}/{fingerprint}: younger than {min_age:.0f}s")
    for stage_name, fingerprint in report.live:
        console.print(f"left alone {stage_name}/{fingerprint}: running now (its checkpoints and inputs stay)")
    console.print(
        f"{verb} {len(report.removed)} artifacts and {len(report.removed_files)} checkpoints/cache shards, "
        f"{report.bytes_freed:,} bytes; kept {len(report.kept)} used by {len(report.kept_runs)} runs"
    )


def print_reward_bench(model: str, report) -> None:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"reward-model accuracy: {model}")
    table.add_column("subset", overflow="fold")
    for name in ("rows", "accuracy", "mean margin"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in report:
        if row.subset == "overall":
            table.add_section()
        table.add_row(row.subset, str(row.rows), f"{row.accuracy:.3f}", f"{row.mean_margin:+.3f}")
    console.print(table)
    console.print(
        "accuracy: the share of rows whose chosen answer the reward model scores above the rejected one (ties half)"
    )


def print_audit(rows) -> None:
    """The token-reward audit table, and a loud warning for every source that points the wrong way."""
    from creditflow.tasks.credit.audit_probes import AUC_WARNING

    def fmt(value: float) -> str:
        return "-" if value != value else f"{value:.3f}"  # NaN: nothing to compare

    # One section per source, named once, so the table stays readable in 80 columns (a log file, a CI job).
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="token-reward audit")
    for name in ("source", "probe"):
        table.add_column(name, no_wrap=True)
    for name in ("items", "paired", "pooled AUC", "bad", "coverage"):
        table.add_column(name, justify="right")
    previous, notes = None, {}
    for row in rows:
        if previous is not None and row.source != previous:
            table.add_section()
        style = "bold red" if row.paired < AUC_WARNING else None
        mark = notes.setdefault(row.note, "*" * (len(notes) + 1)) if row.note else ""
        cells = ("" if row.source == previous else row.source, row.kind + mark, str(row.items))
        table.add_row(*cells, fmt(row.paired), fmt(row.auc), str(row.bad_tokens), fmt(row.coverage), style=style)
        previous = row.source
    console.print(table)
    console.print(
        "paired (the headline): the share of items whose bad tokens score below the correct answer's tokens at the "
        "same place, ties half; 0.5 is chance. pooled AUC: P(a bad token scores below any other token of the pool), "
        "which also rewards telling the slot from its frame. bad: tokens on a bad span."
    )
    for note, mark in notes.items():
        console.print(f"{mark} {note}")
    for row in rows:
        if row.kind == "all" and row.paired < AUC_WARNING:
            console.print(
                f"[bold red]WARNING: {row.source} points the wrong way (paired score {row.paired:.3f} < 0.5): "
                "planted errors get HIGHER token rewards than the correct tokens in their place[/]"
            )
