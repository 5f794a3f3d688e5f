"""``creditflow`` command line: run the pipeline or one stage, query the catalog, open the MLflow UI."""

from __future__ import annotations

from creditflow.flows.env import apply_defaults

apply_defaults()  # before Prefect/MLflow/transformers read their settings

import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from creditflow.flows.cli_common import (  # noqa: E402
    DEBUG,
    ConfigOpt,
    SetOpt,
    WorkspaceOpt,
    config_dict,
    user_errors,
)
from creditflow.flows.cli_rewards import rewards_app  # noqa: E402
from creditflow.flows.render import (  # noqa: E402
    console,
    experiment_link,
    print_comparison,
    print_gc,
    print_results,
    print_rows,
    print_runs,
    print_servers,
    print_stages,
    print_summary,
    print_where_to_look,
)

app = typer.Typer(
    help="CreditFlow: preference data -> reward model -> token rewards -> aligned policy.", no_args_is_help=True
)
data_app = typer.Typer(help="Bundled data.", no_args_is_help=True)
catalog_app = typer.Typer(help="The DuckDB catalog over the artifact store.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(catalog_app, name="catalog")


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Full tracebacks and Prefect's own logs on errors."),
) -> None:
    DEBUG["on"] = debug
    if not debug:  # Prefect logs every failed flow's traceback itself; our one-line error says what went wrong
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    workspace: Optional[str] = WorkspaceOpt,
    from_stage: Optional[str] = typer.Option(
        None, "--from", help="Recompute from this stage on; earlier stages come from the cache."
    ),
    refresh: Optional[list[str]] = typer.Option(
        None, "--refresh", help="Recompute this stage even if cached (repeatable)."
    ),
    set_: Optional[list[str]] = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    name: Optional[str] = typer.Option(
        None, "--name", help="MLflow run name. Default: from the config (method, alpha, LoRA, seed)."
    ),
) -> None:
    """Run the whole pipeline (cached stages are reused)."""
    with user_errors():
        cfg = config_dict(config, set_)
        from creditflow.flows.pipeline import run_pipeline

        result = run_pipeline(
            config=cfg,
            workspace=workspace,
            from_stage=from_stage,
            refresh=refresh or [],
            progress=not quiet,
            run_name=name,
        )
    print_stages(result, title=result["run_name"])
    print_results(result)
    print_where_to_look(result["workspace"], result["mlflow_run_id"])


@app.command()
def demo(
    workspace: Optional[str] = WorkspaceOpt,
    tiny: bool = typer.Option(False, "--tiny", help="Tiny models, few steps: every stage in about a minute (CI)."),
    seed: Optional[list[int]] = typer.Option(None, "--seed", help="Policy seed (repeatable). Default: 0."),
    alpha: float = typer.Option(0.25, help="T-REG weight of the DPO + T-REG variant."),
    method: Optional[list[str]] = typer.Option(
        None, "--method", help="dpo, t-reg, t-reg-abc (repeatable). Default: dpo and t-reg."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Offline demo: DPO vs DPO + T-REG on SmolLM2-135M-Instruct, evaluated against the reference, as a table."""
    # A newcomer reads progress bars and the table, not Prefect's per-flow-run log lines or loading reports.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from creditflow.flows.demo import DEFAULT_METHODS, comparison_table, plan_demo, run_demo, summary_table

    plan = plan_demo(tiny)
    if plan.fallback_reason:
        console.print(f"[bold yellow]note:[/] {plan.fallback_reason}")
    console.print(f"demo config: {plan.config}")
    with user_errors():
        results = run_demo(plan, workspace, seed or [0], alpha, not quiet, tuple(method or DEFAULT_METHODS))
    for result in results:
        print_stages(result, title=result["run_name"])
    rows = comparison_table(results)
    print_comparison(rows)
    if len(seed or [0]) > 1:
        print_summary(summary_table(rows))
    print_where_to_look(results[-1]["workspace"], results[-1]["mlflow_run_id"])


@app.command()
def stage(
    name: str = typer.Argument(
        ..., help="curate, reward_model, onpolicy, token_rewards, policy, rl, evaluate or audit."
    ),
    config: Optional[Path] = ConfigOpt,
    workspace: Optional[str] = WorkspaceOpt,
    refresh: bool = typer.Option(False, "--refresh", help="Recompute even if cached."),
    set_: Optional[list[str]] = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Run one stage alone; its upstream artifacts must already be in the workspace."""
    with user_errors():
        cfg = config_dict(config, set_)
        from creditflow.flows.pipeline import run_stage_alone

        result = run_stage_alone(name, cfg, workspace, refresh=refresh, progress=not quiet)
    print_stages({"stages": {name: result}})
    from creditflow.storage.workspace import Workspace

    console.print(f"artifact: {Workspace.resolve(workspace).store.path(name, result['manifest']['fingerprint'])}")


@app.command()
def sql(
    query: str = typer.Argument(..., help="SQL over the catalog's views, e.g. SELECT * FROM curate_pairs LIMIT 5"),
    workspace: Optional[str] = WorkspaceOpt,
    limit: int = typer.Option(50, help="Rows to print (table format only)."),
    fmt: str = typer.Option("table", "--format", help="table | csv | json (csv and json print every row)."),
) -> None:
    """Query the workspace's DuckDB catalog (views: <stage>_<table>, artifacts, stage_runs); read-only, one SELECT."""
    from creditflow.storage.catalog import Catalog
    from creditflow.storage.workspace import Workspace

    with user_errors():
        if fmt not in ("table", "csv", "json"):
            raise ValueError(f"--format must be table, csv or json, got {fmt!r}")
        ws = Workspace.resolve(workspace)
        columns, rows = Catalog(ws.catalog_path, ws.store).query_user(query)
    if fmt != "table":
        print_rows(columns, rows, fmt)
        return
    table = Table(*columns)
    for row in rows[:limit]:
        table.add_row(*(str(v)[:80] for v in row))
    console.print(table)
    if len(rows) > limit:
        console.print(f"... {len(rows) - limit} more rows (--format csv or json prints all)")


@app.command()
def ui(
    workspace: Optional[str] = WorkspaceOpt,
    port: int = typer.Option(5000, help="Port on 127.0.0.1."),
) -> None:
    """Serve the MLflow UI for this workspace on 127.0.0.1 (Ctrl-C to stop); with `creditflow up`, print its URL."""
    from creditflow.storage.workspace import Workspace

    server = os.environ.get("MLFLOW_TRACKING_URI")
    if server:
        console.print(f"MLflow UI: {server}   (MLFLOW_TRACKING_URI: `creditflow up`'s server, or yours)")
        return
    with user_errors():
        ws = Workspace.resolve(workspace)
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    console.print(f"MLflow UI: {experiment_link(f'http://127.0.0.1:{port}')}")
    os.execv(
        mlflow,
        [mlflow, "ui", "--backend-store-uri", ws.mlflow_tracking_uri, "--host", "127.0.0.1", "--port", str(port)],
    )


@app.command("config")
def show_config(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    explain: bool = typer.Option(False, "--explain", help="Every key with its default and what it does."),
) -> None:
    """Print the full resolved config (defaults filled in), as the stages will see it."""
    import yaml

    if explain:
        from creditflow.flows.config import explain as explained

        table = Table("key", "default", "what it does")
        for key, default, description in explained():
            table.add_row(key, default, description)
        console.print(table)
        return
    with user_errors():
        console.print(yaml.safe_dump(config_dict(config, set_), sort_keys=False), end="", highlight=False)


@catalog_app.command("refresh")
def catalog_refresh(workspace: Optional[str] = WorkspaceOpt) -> None:
    """Rebuild the catalog's tables and views from the manifests on disk."""
    from creditflow.storage.catalog import Catalog
    from creditflow.storage.workspace import Workspace

    with user_errors():
        ws = Workspace.resolve(workspace)
        report = Catalog(ws.catalog_path, ws.store).refresh()
    if report.moved_aside:
        console.print(f"[yellow]warning:[/] {ws.catalog_path} was not a DuckDB database; moved to {report.moved_aside}")
    for reason in report.skipped:
        console.print(f"[yellow]skipped[/] {reason}", highlight=False)
    console.print(f"{ws.catalog_path}: views {', '.join(report.views) or '(none yet)'}")


@data_app.command("sample")
def data_sample(
    out: Path = typer.Option(..., "--out", help="JSONL file to write."),
    prompts: int = typer.Option(300, help="Number of prompts."),
    seed: int = typer.Option(0),
) -> None:
    """Regenerate the bundled synthetic preference set (vaderSentiment labels)."""
    from creditflow.tasks.data.sample_data import write_sample

    with user_errors():
        rows = write_sample(out, prompts, seed)
    console.print(f"{out}: {rows} rows")


artifacts_app = typer.Typer(help="The artifact store.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")


@app.command()
def up(
    workspace: Optional[str] = WorkspaceOpt,
    prefect_port: int = typer.Option(4200, help="Prefect server port on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, help="MLflow server port on 127.0.0.1."),
    timeout: float = typer.Option(120.0, help="Seconds to wait for both servers to answer their health checks."),
) -> None:
    """Start local Prefect and MLflow servers for this workspace; later creditflow commands use them."""
    from creditflow.flows import ops

    with user_errors():
        env = ops.up(workspace, {"prefect": prefect_port, "mlflow": mlflow_port}, timeout=timeout)
    for key, value in env.items():
        console.print(f"{key}={value}")
    print_servers(workspace)


@app.command()
def down(
    workspace: Optional[str] = WorkspaceOpt,
    grace: float = typer.Option(10.0, help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Stop the servers started by `creditflow up`."""
    from creditflow.flows import ops

    with user_errors():
        outcomes = ops.down(workspace, grace=grace)
    for name, outcome in outcomes.items():
        console.print(f"{name}: {outcome}")


@app.command()
def status(workspace: Optional[str] = WorkspaceOpt) -> None:
    """Show the local servers' pid, URL and health."""
    with user_errors():
        print_servers(workspace)


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    workspace: Optional[str] = WorkspaceOpt,
    set_: Optional[list[str]] = SetOpt,
    cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 3 * * *".'),
    interval: Optional[float] = typer.Option(None, help="Run every this many seconds."),
    name: str = typer.Option("scheduled", help="Deployment name: creditflow-pipeline/<name>."),
    limit: int = typer.Option(1, min=1, help="Pipeline runs at once; a run due while they go waits."),
) -> None:
    """Register the pipeline as a scheduled Prefect deployment and run its flow runs (Ctrl-C to stop)."""
    from creditflow.flows import ops

    with user_errors():
        ops.serve(config_dict(config, set_), workspace, name, cron=cron, interval=interval, limit=limit)


@app.command()
def runs(
    workspace: Optional[str] = WorkspaceOpt,
    limit: int = typer.Option(10, help="Most recent runs to show."),
) -> None:
    """Recent pipeline runs: each stage's fingerprint, cache hit and whether its artifact still exists."""
    from creditflow.flows import ops

    with user_errors():
        print_runs(ops.list_runs(workspace, limit))


@app.command()
def join(
    stage_name: str = typer.Argument("policy", metavar="STAGE", help="The multi-node stage: policy or reward_model."),
    config: Optional[Path] = ConfigOpt,
    workspace: Optional[str] = WorkspaceOpt,
    set_: Optional[list[str]] = SetOpt,
    node_rank: int = typer.Option(..., "--node-rank", envvar="CREDITFLOW_NODE_RANK", help="This node: 1..nnodes-1."),
    timeout: float = typer.Option(86400.0, help="Seconds to wait for node 0."),
) -> None:
    """Join node 0's multi-node run of STAGE (its nnodes > 1) from another node, same config and workspace."""
    from creditflow.flows import ops

    with user_errors():
        status = ops.join_stage(stage_name, config_dict(config, set_), workspace, node_rank, timeout)
    raise typer.Exit(status)


@app.command()
def export(
    stage_name: str = typer.Argument(..., metavar="STAGE", help="A stage that trains a model: policy or reward_model."),
    out: Path = typer.Option(..., "--out", help="New (or empty) folder for the Hugging Face model."),
    run: Optional[str] = typer.Option(None, "--run", help="Pipeline or MLflow run id (or prefix); default: newest."),
    adapter: bool = typer.Option(False, "--adapter", help="Export the LoRA adapter instead of the merged model."),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Write a self-contained Hugging Face folder (weights, tokenizer, model card) for a trained model."""
    from creditflow.flows.export import export_model
    from creditflow.storage.workspace import Workspace

    with user_errors():
        folder = export_model(Workspace.resolve(workspace), stage_name, out, run_id=run, adapter=adapter)
    auto_class = "AutoModelForSequenceClassification" if stage_name == "reward_model" else "AutoModelForCausalLM"
    loader = "peft.AutoPeftModelForCausalLM" if adapter else f"transformers.{auto_class}"
    console.print(f"exported {stage_name} to {folder}; load it with {loader}.from_pretrained({str(folder)!r})")


@app.command()
def generations(
    prompts: Path = typer.Argument(..., help="AlpacaEval (JSON list) or Arena-Hard (question.jsonl) prompts."),
    out: Path = typer.Option(..., "--out", help="Writes alpaca_eval/<system>.json and arena_hard/<system>.jsonl."),
    model: Optional[list[str]] = typer.Option(
        None,
        "--model",
        help="NAME=SPEC (a folder or hub id), repeatable. Default: the newest policy, RL policy and "
        "their reference in the workspace.",
    ),
    max_new_tokens: int = typer.Option(512, help="Tokens per answer."),
    temperature: float = typer.Option(0.7, help="0 decodes greedily."),
    seed: int = typer.Option(0, help="Sampling seed."),
    batch_size: int = typer.Option(8, help="Prompts per generate() call."),
    trust_remote_code: bool = typer.Option(False, help="Let models that ship their own code run it."),
    workspace: Optional[str] = WorkspaceOpt,
) -> None:
    """Each system's answers to a prompt file, in AlpacaEval's and Arena-Hard's input formats (their own judges
    score them)."""
    from creditflow.flows.export import newest_systems
    from creditflow.storage.workspace import Workspace
    from creditflow.tasks.config_base import SamplingConfig
    from creditflow.tasks.infer.benchmark_outputs import read_prompt_file, write_outputs
    from creditflow.tasks.infer.generation import generate
    from creditflow.tasks.models.resolve import resolve_model

    with user_errors():
        questions = read_prompt_file(prompts)
        if model:
            pairs = [spec.partition("=") for spec in model]
            if any(not name or not sep or not path for name, sep, path in pairs):
                raise ValueError("--model expects NAME=SPEC, e.g. --model dpo=./my-policy")
            systems = {name: resolve_model(path) for name, _, path in pairs}
        else:
            systems = newest_systems(Workspace.resolve(workspace), trust_remote_code)
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size
        )
        messages = [[{"role": "user", "content": q.instruction}] for q in questions]
        for name, folder in systems.items():
            console.print(f"{name}: answering {len(questions)} prompts with {folder}")
            answers = [s[0] for s in generate(folder, messages, 1, sampling, trust_remote_code=trust_remote_code)]
            for path in write_outputs(out, name, questions, answers):
                console.print(f"  wrote {path}")


@artifacts_app.command("gc")
def artifacts_gc(
    keep: int = typer.Option(..., "--keep", min=0, help="Keep the artifacts of this many most recent runs."),
    workspace: Optional[str] = WorkspaceOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be removed."),
    min_age: float = typer.Option(
        600.0, help="Never remove artifacts younger than this many seconds (a running pipeline may need them)."
    ),
) -> None:
    """Delete artifacts that none of the N most recent runs (or their upstream artifacts) reference."""
    from creditflow.storage.gc import collect_garbage
    from creditflow.storage.workspace import Workspace

    with user_errors():
        ws = Workspace.resolve(workspace)
        report = collect_garbage(ws, keep, dry_run=dry_run, min_age=min_age)
    print_gc(report, ws, dry_run, min_age)


app.add_typer(rewards_app, name="rewards")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
