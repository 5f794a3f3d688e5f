"""Integration: real Prefect flows, MLflow on SQLite, DuckDB and Parquet, end to end on the bundled sample."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from creditflow.flows import pipeline as pipeline_module
from creditflow.flows import stages as stage_module
from creditflow.flows.config import ConfigError, PipelineConfig, load_config
from creditflow.flows.pipeline import curate_flow, pipeline_flow, reward_model_flow
from creditflow.flows.registry import STAGES
from creditflow.flows.stages import StageNotReady
from creditflow.storage.workspace import Workspace
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.models.tiny import build_tiny_causal_lm

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]


def _config(**curate_overrides) -> dict:
    """The default pipeline on tiny models (the bundled sample's tiny Llama as reference policy)."""
    cfg = PipelineConfig().model_dump(mode="json")
    cfg["curate"].update(curate_overrides)
    cfg["reference_model"] = "tiny-lm"
    cfg["token_rewards"].update(max_length=256, max_prompt_length=128, heatmap_pairs=1)
    cfg["reward_model"].update(max_steps=5)
    cfg["policy"].update(max_steps=3, batch_size=4, learning_rate=1e-3)
    cfg["evaluate"].update(max_prompts=4, max_new_tokens=8)
    return cfg


def _child_runs(workspace: Path, parent_run_id: str):
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("creditflow")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return client, {run.data.tags["creditflow.stage"]: run for run in runs}


def test_pipeline_writes_artifacts_catalog_and_mlflow_tree_then_hits_cache(tmp_path):
    first = pipeline_flow(config=_config(), workspace=str(tmp_path), progress=False)
    stage = first["stages"]["curate"]
    manifest = stage["manifest"]
    assert stage["cache_hit"] is False
    artifact = tmp_path / "artifacts" / "curate" / manifest["fingerprint"]
    assert (artifact / "manifest.json").is_file()
    pairs = pq.read_table(artifact / "pairs.parquet")
    quarantine = pq.read_table(artifact / "quarantine.parquet")
    assert pairs.num_rows == manifest["row_counts"]["pairs"] > 300
    assert quarantine.num_rows == manifest["row_counts"]["quarantine"] > 0
    assert manifest["metrics"]["rows_in"] == pairs.num_rows + quarantine.num_rows
    assert manifest["mlflow_run_id"] == stage["mlflow_run_id"]
    assert manifest["config"]["eval_fraction"] == 0.1 and manifest["inputs"]["sources"][0]
    assert not list((tmp_path / "artifacts" / "curate").glob(".tmp-*"))

    # MLflow: one parent, one child per stage, tagged; metrics and manifest logged on the child.
    client, children = _child_runs(tmp_path, first["mlflow_run_id"])
    assert sorted(children) == ["curate", "evaluate", "policy", "reward_model", "token_rewards"]
    child = children["curate"]
    assert child.data.tags["creditflow.fingerprint"] == manifest["fingerprint"]
    assert child.data.tags["creditflow.cache_hit"] == "false"
    assert child.data.metrics["quarantined.duplicate"] == manifest["metrics"]["quarantined.duplicate"] > 0
    # params are prefixed by stage, so they compare across runs and stages in the MLflow UI
    assert child.data.params["curate.eval_fraction"] == "0.1"
    assert children["policy"].data.params["policy.loss.alpha"] == str(_config()["policy"]["loss"]["alpha"])
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"manifest.json", "curate"}
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"

    # DuckDB: views over the Parquet outputs, with the artifact's fingerprint on every row.
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        n, fingerprints = con.execute("SELECT count(*), list(DISTINCT fingerprint) FROM curate_pairs").fetchone()
        assert n == pairs.num_rows and fingerprints == [manifest["fingerprint"]]
        rules = dict(con.execute("SELECT rule, count(*) FROM curate_quarantine GROUP BY rule").fetchall())
        assert rules["duplicate"] == manifest["metrics"]["quarantined.duplicate"]
        leaked = con.execute(
            "SELECT count(*) FROM (SELECT prompt_id FROM curate_pairs "
            "GROUP BY prompt_id HAVING count(DISTINCT split) > 1)"
        ).fetchone()[0]
        assert leaked == 0

    # Downstream stages: per-token rewards queryable in DuckDB, a trained policy, an evaluation.
    stages = first["stages"]
    assert stages["token_rewards"]["manifest"]["row_counts"]["token_rewards"] == 2 * pairs.num_rows
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        aligned = con.execute(
            "SELECT count(*) FROM token_rewards_token_rewards WHERE len(token_ids) = len(rewards) "
            "AND len(rewards) = len(ref_logps) AND list_max(rewards) < 0.5 AND list_min(rewards) > -0.5"
        ).fetchone()[0]
        assert aligned == 2 * pairs.num_rows
        systems = con.execute("SELECT list(DISTINCT system ORDER BY system) FROM evaluate_generations").fetchone()[0]
        assert systems == ["policy", "reference"]
    policy = stages["policy"]["manifest"]
    assert (tmp_path / "artifacts" / "policy" / policy["fingerprint"] / "model" / "model.safetensors").is_file()
    assert policy["metrics"]["steps"] == 3
    assert 0.0 <= stages["evaluate"]["manifest"]["metrics"]["win_rate_rm"] <= 1.0

    second = pipeline_flow(config=_config(), workspace=str(tmp_path), progress=False)
    again = second["stages"]["curate"]
    assert again["cache_hit"] is True
    assert again["manifest"] == manifest  # the very same artifact, not a recomputation
    assert second["stages"]["reward_model"]["cache_hit"] is True
    _, children = _child_runs(tmp_path, second["mlflow_run_id"])
    assert {name: run.data.tags["creditflow.cache_hit"] for name, run in children.items()} == {
        "curate": "true",
        "reward_model": "true",
        "token_rewards": "true",
        "policy": "true",
        "evaluate": "true",
    }
    assert children["curate"].data.tags["creditflow.source_run_id"] == manifest["mlflow_run_id"]
    assert children["curate"].data.metrics["pairs_out"] == manifest["metrics"]["pairs_out"]
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        hits = con.execute(
            "SELECT list(cache_hit ORDER BY finished_at) FROM stage_runs WHERE stage = 'curate'"
        ).fetchone()
        assert hits[0] == [False, True]


def test_row_affecting_knobs_and_input_content_are_cache_misses(tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(sources=[{"path": str(data)}])
    ws = tmp_path / "ws"

    base = pipeline_flow(config=cfg, workspace=str(ws), progress=False)["stages"]["curate"]
    knob = pipeline_flow(
        config={**cfg, "curate": {**cfg["curate"], "eval_fraction": 0.3}}, workspace=str(ws), progress=False
    )["stages"]["curate"]
    assert knob["cache_hit"] is False
    assert knob["manifest"]["fingerprint"] != base["manifest"]["fingerprint"]

    data.write_text(data.read_text() + json.dumps({"prompt": "new", "chosen": "yes", "rejected": "no"}) + "\n")
    edited = pipeline_flow(config=cfg, workspace=str(ws), progress=False)["stages"]["curate"]
    assert edited["cache_hit"] is False
    assert edited["manifest"]["row_counts"]["pairs"] == base["manifest"]["row_counts"]["pairs"] + 1

    # The MLflow experiment name is not row-affecting: still a hit.
    renamed = pipeline_flow(config={**cfg, "experiment": "other"}, workspace=str(ws), progress=False)["stages"][
        "curate"
    ]
    assert renamed["cache_hit"] is True


def test_refresh_from_and_deleted_artifacts_recompute(tmp_path):
    cfg = _config()
    base = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]["curate"]

    refreshed = pipeline_flow(config=cfg, workspace=str(tmp_path), refresh=["curate"], progress=False)["stages"][
        "curate"
    ]
    assert refreshed["cache_hit"] is False
    assert refreshed["manifest"]["fingerprint"] == base["manifest"]["fingerprint"]
    assert refreshed["manifest"]["digest"] == base["manifest"]["digest"]  # deterministic outputs
    assert refreshed["manifest"]["mlflow_run_id"] != base["manifest"]["mlflow_run_id"]

    rerun = pipeline_flow(config=cfg, workspace=str(tmp_path), from_stage="curate", progress=False)["stages"]["curate"]
    assert rerun["cache_hit"] is False

    # Prefect still remembers the result, but the artifact is gone: the stage must recompute, not point at nothing.
    shutil.rmtree(tmp_path / "artifacts" / "curate" / base["manifest"]["fingerprint"])
    recovered = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]["curate"]
    assert recovered["cache_hit"] is False
    assert (tmp_path / "artifacts" / "curate" / base["manifest"]["fingerprint"] / "pairs.parquet").is_file()

    with pytest.raises(ValueError, match="unknown or disabled stage 'nope'"):
        pipeline_flow(config=cfg, workspace=str(tmp_path), from_stage="nope", progress=False)


def test_stage_flow_runs_alone_with_its_own_mlflow_run(tmp_path):
    result = curate_flow(config=_config(), workspace=str(tmp_path), progress=False)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["creditflow.stage"] == "curate"
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.metrics["pairs_out"] == result["manifest"]["row_counts"]["pairs"]
    leases = tmp_path / "leases"  # the stage held a lease for `artifacts gc` while it computed, and let it go
    assert leases.is_dir() and not any(leases.iterdir())


def test_malformed_input_fails_the_flow_and_keeps_existing_artifacts(tmp_path):
    good = pipeline_flow(config=_config(), workspace=str(tmp_path), progress=False)["stages"]["curate"]["manifest"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    with pytest.raises(MalformedInputError, match=r"bad\.jsonl: line 2: invalid JSON"):
        pipeline_flow(config=_config(sources=[{"path": str(bad)}]), workspace=str(tmp_path), progress=False)
    store = Workspace.resolve(tmp_path).store
    assert [m.fingerprint for m in store.manifests("curate")] == [good["fingerprint"]]
    assert store.read_table(store.load("curate", good["fingerprint"]), "pairs").num_rows == good["row_counts"]["pairs"]
    assert not list((tmp_path / "artifacts" / "curate").glob(".tmp-*"))


def test_cli_in_a_new_process_hits_the_cache(tmp_path):
    """Cache hits hold across processes: the Prefect result and the artifact live in the workspace."""
    from prefect.settings import PREFECT_API_URL

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_config()))
    first = pipeline_flow(config=_config(), workspace=str(tmp_path), progress=False)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # reuse the harness server instead of starting one
    out = subprocess.run(
        [sys.executable, "-m", "creditflow.flows.cli", "run", "-c", str(config), "-w", str(tmp_path), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "hit" in out.stdout
    assert "dpo seed=0" in out.stdout  # the run name from the config
    assert "results" in out.stdout and "win_rate_rm" in out.stdout and "final_loss" in out.stdout
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT fingerprint, cache_hit FROM stage_runs WHERE stage = 'curate' ORDER BY finished_at"
        ).fetchall()
    fingerprint = first["stages"]["curate"]["manifest"]["fingerprint"]
    assert rows == [(fingerprint, False), (fingerprint, True)]

    pair_id = pq.read_table(tmp_path / "artifacts" / "curate" / fingerprint / "pairs.parquet")["pair_id"][0].as_py()
    shown = subprocess.run(
        [sys.executable, "-m", "creditflow.flows.cli", "rewards", "show", pair_id, "-w", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"pair {pair_id}" in shown.stdout and "chosen · contrastive" in shown.stdout


def test_reward_model_stage_checkpoint_and_its_own_cache_key(tmp_path):
    cfg = _config()
    first = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    rm = first["reward_model"]["manifest"]
    model_dir = tmp_path / "artifacts" / "reward_model" / rm["fingerprint"] / "model"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert rm["inputs"]["upstream"] == {"curate": first["curate"]["manifest"]["digest"]}
    assert (
        0.0 <= rm["metrics"]["eval.accuracy"] <= 1.0 and rm["row_counts"]["eval_scores"] == rm["metrics"]["eval_pairs"]
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(first["reward_model"]["mlflow_run_id"], "train.loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]  # reward_model.max_steps
    artifacts = {a.path for a in client.list_artifacts(first["reward_model"]["mlflow_run_id"], "reward_model")}
    assert "reward_model/eval_rewards.png" in artifacts and "reward_model/model.json" in artifacts

    # A reward-model knob: curation is reused, the reward model is retrained.
    cfg["reward_model"]["learning_rate"] = 1e-4
    second = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    assert second["curate"]["cache_hit"] is True and second["reward_model"]["cache_hit"] is False
    assert second["reward_model"]["manifest"]["fingerprint"] != rm["fingerprint"]

    # Run alone from cached curation; with no curated artifact for a config it refuses clearly.
    alone = reward_model_flow(config=cfg, workspace=str(tmp_path), progress=False)
    assert alone["cache_hit"] is True
    cfg["curate"]["eval_fraction"] = 0.25
    with pytest.raises(StageNotReady, match="needs the 'curate' artifact"):
        reward_model_flow(config=cfg, workspace=str(tmp_path), progress=False)


def test_onpolicy_stage_builds_pairs_from_policy_samples(tmp_path):
    policy = build_tiny_causal_lm(tmp_path / "policy", ["It was a wonderful day at the park."] * 20, seed=3)
    cfg = _config(sources=[{"builtin": "sample", "limit": 60}])
    cfg["reference_model"] = str(policy)  # samples the pairs, scores their tokens, starts the policy
    cfg["onpolicy"].update(enabled=True, samples_per_prompt=3, max_new_tokens=10, max_prompts=12)
    result = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    assert list(result) == ["curate", "reward_model", "onpolicy", "token_rewards", "policy", "evaluate"]
    manifest = result["onpolicy"]["manifest"]
    assert manifest["inputs"]["upstream"].keys() == {"curate", "reward_model"}
    assert manifest["metrics"]["prompts"] == 12
    assert manifest["row_counts"]["pairs"] + manifest["row_counts"]["quarantine"] == 12
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        bad = con.execute("SELECT count(*) FROM onpolicy_pairs WHERE score_chosen < score_rejected").fetchone()[0]
        assert bad == 0
        leaked = con.execute(
            "SELECT count(*) FROM onpolicy_pairs o JOIN curate_pairs c USING (prompt_id) WHERE o.split <> c.split"
        ).fetchone()[0]
        assert leaked == 0
    assert not list((tmp_path / "checkpoints").glob("*/*/shards"))  # finished shards go once the stage publishes
    again = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    assert all(stage["cache_hit"] for stage in again.values())


def test_the_pipeline_plans_each_stage_once_and_refreshes_the_catalog_once(tmp_path, monkeypatch):
    """...and pins its hub ids once: the stage subflows take the pinned config."""
    planned, refreshed, pinned = [], [], []
    real_plan, real_refresh = stage_module.plan_stage, stage_module.Catalog.refresh
    real_pin = pipeline_module.pin_hub_revisions

    def counting_pin(config):
        pinned.append(1)
        return real_pin(config)

    def counting_plan(name, cfg, upstream):
        planned.append(name)
        return real_plan(name, cfg, upstream)

    def counting_refresh(catalog):
        refreshed.append(catalog.path)
        return real_refresh(catalog)

    monkeypatch.setattr(stage_module, "plan_stage", counting_plan)
    monkeypatch.setattr(stage_module.Catalog, "refresh", counting_refresh)
    monkeypatch.setattr(pipeline_module, "pin_hub_revisions", counting_pin)
    result = pipeline_flow(config=_config(), workspace=str(tmp_path), progress=False)
    assert planned == list(result["stages"]) == ["curate", "reward_model", "token_rewards", "policy", "evaluate"]
    assert refreshed == [tmp_path / "catalog.duckdb"]
    assert len(pinned) == 1
    pipeline_module.run_pipeline(config=_config(), workspace=str(tmp_path), progress=False)  # cached: the light path
    assert len(pinned) == 2
    for name, stage in result["stages"].items():  # every declared output is in the manifest
        outputs = stage["manifest"]["outputs"]
        for output in STAGES[name].outputs:
            group = (output,) if isinstance(output, str) else output
            assert any(f == f"{o}.parquet" or f.startswith(o) for o in group for f in outputs), (name, output)


def test_old_model_keys_point_at_reference_model(tmp_path):
    config = tmp_path / "old.yaml"
    for section, key in (("onpolicy", "policy"), ("token_rewards", "model")):
        config.write_text(f"{section}:\n  {key}: smollm2\n")
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: this key is now the top-level `reference_model`"):
            load_config(config)


def test_refreshing_a_stage_with_identical_outputs_keeps_downstream_hits(tmp_path):
    """Timings (tokens/s, memory) are volatile outputs: a recompute with byte-identical weights keeps its digest."""
    cfg = _config()
    first = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    again = pipeline_flow(config=cfg, workspace=str(tmp_path), refresh=["policy"], progress=False)["stages"]
    assert again["policy"]["cache_hit"] is False
    assert again["policy"]["manifest"]["digest"] == first["policy"]["manifest"]["digest"]
    outputs = again["policy"]["manifest"]["outputs"]
    assert outputs["train_timings.parquet"]["volatile"] is True and "volatile" not in outputs["train_log.parquet"]
    assert again["evaluate"]["cache_hit"] is True


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    from prefect.settings import PREFECT_API_URL

    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_config(sources=[{"path": str(data)}])))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}  # as a user's shell has it
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    command = [sys.executable, "-m", "creditflow.flows.cli"]
    args = ["run", "-c", str(config), "-w", str(tmp_path / "ws"), "--quiet"]
    out = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "bad.jsonl: line 2: invalid JSON" in out.stdout and "Traceback" not in out.stdout + out.stderr
    debug = subprocess.run([*command, "--debug", *args], env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "MalformedInputError" in debug.stderr


def test_parent_run_carries_the_headline_and_a_name_from_the_config(tmp_path):
    cfg = _config()
    cfg["policy"]["loss"]["alpha"] = 0.25
    result = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)
    assert result["run_name"] == "dpo+t-reg(contrastive, α=0.25) seed=0"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(result["mlflow_run_id"]).data
    assert parent.params["alpha"] == "0.25" and parent.params["loss_type"] == "dpo" and parent.params["lora"] == "none"
    assert {"evaluate.win_rate_rm", "policy.final_loss", "curate.pairs_out"} <= set(parent.metrics)
    named = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False, run_name="my sweep 1")
    assert client.get_run(named["mlflow_run_id"]).info.run_name == "my sweep 1"
    with pytest.raises(ValueError, match="cannot run together: curate.eval_fraction is 0"):
        pipeline_flow(config={**cfg, "curate": {**cfg["curate"], "eval_fraction": 0.0}}, workspace=str(tmp_path))


def test_a_fully_cached_run_is_one_light_record_without_prefect_or_models(tmp_path):
    cfg = _config()
    first = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)
    probe = (
        "import json, sys; from creditflow.flows.pipeline import run_pipeline; "
        f"r = run_pipeline(config=json.loads({json.dumps(json.dumps(cfg))}), workspace={str(tmp_path)!r}); "
        "print(json.dumps({'hits': [s['cache_hit'] for s in r['stages'].values()], 'run': r['mlflow_run_id'], "
        "'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))"
    )
    # An unreachable Prefect API: touching Prefect at all would fail the run.
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["hits"] == [True] * 5 and report["heavy"] == []

    client, children = _child_runs(tmp_path, report["run"])
    assert children == {}  # one run, no child per stage
    tags = client.get_run(report["run"]).data.tags
    assert tags["creditflow.cached"] == "true"
    for name, stage in first["stages"].items():
        assert tags[f"creditflow.source_run.{name}"] == stage["mlflow_run_id"]  # links the run that computed it
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        recorded = con.execute("SELECT count(*) FROM stage_runs WHERE pipeline_run_id = ?", [report["run"]]).fetchone()
    assert recorded == (5,)

    # `creditflow stage reward_model` on the cached artifact: its own MLflow run and catalog row, no Prefect either
    stage_probe = (
        "import json; from creditflow.flows.pipeline import run_stage_alone; "
        f"r = run_stage_alone('reward_model', json.loads({json.dumps(json.dumps(cfg))}), {str(tmp_path)!r}); "
        "print(json.dumps({'hit': r['cache_hit'], 'run': r['mlflow_run_id']}))"
    )
    out = subprocess.run([sys.executable, "-c", stage_probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    alone = json.loads(out.stdout.strip().splitlines()[-1])
    assert alone["hit"] and client.get_run(alone["run"]).data.tags["creditflow.cache_hit"] == "true"
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM stage_runs WHERE mlflow_run_id = ?", [alone["run"]]).fetchone() == (1,)


def test_the_optional_audit_stage_runs_after_evaluation_and_is_cached(tmp_path):
    cfg = _config()
    cfg["audit"].update(enabled=True, per_kind=2, sentiment=2, max_length=128)
    result = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    assert list(result)[-1] == "audit"
    manifest = result["audit"]["manifest"]
    assert manifest["inputs"]["upstream"].keys() == {"reward_model", "policy"}
    assert (
        manifest["config"]["reference_model"] == "tiny-lm" and manifest["metrics"]["items"] == 6 * 2 + 2
    )  # 6 kinds x 2, 2 flips
    sources = {k.split(".")[0] for k in manifest["metrics"] if k.endswith(".auc")}
    presets = {"contrastive:revision", "contrastive:guideline", "contrastive:prefix"}
    assert presets | {"reference log-prob", "dpo-implicit"} <= sources
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(DISTINCT source) FROM audit_audit").fetchone()[0] == 7  # + 2 ABC forms
    again = pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)["stages"]
    assert again["audit"]["cache_hit"] is True


def test_too_few_pairs_fail_right_after_curation_before_the_reward_model_trains(tmp_path):
    data = tmp_path / "few.jsonl"
    rows = [{"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _config(sources=[{"path": str(data)}], eval_fraction=0.3)
    cfg["policy"].update(num_processes=2, batch_size=4)  # needs 5 train pairs
    with pytest.raises(ValueError, match=r"after curate: .*policy needs 5 train pairs for 2 processes of batch 4"):
        pipeline_flow(config=cfg, workspace=str(tmp_path), progress=False)
    assert (
        Workspace.resolve(tmp_path).store.manifests("curate") and not (tmp_path / "artifacts" / "reward_model").exists()
    )


def test_the_pipeline_runs_on_hub_ids_from_the_offline_hf_cache_and_exports_hf_folders(tmp_path, monkeypatch):
    """The real hub code path (huggingface_hub's cache layout, HF_HUB_OFFLINE=1), no mocks: `org/name` specs for
    the model, tokenizer and dataset; an adapter-only LoRA policy (lora.save_merged: false) that evaluate and
    `creditflow export` merge onto its hub base; model cards."""
    from conftest import CORPUS
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from creditflow.flows.cli import app
    from creditflow.tasks.configs import SourceConfig
    from creditflow.tasks.data.ingest import BUILTIN, source_path

    hub = tmp_path / "hub"
    snapshot = hub / "models--acme--tiny-lm" / "snapshots" / ("c" * 40)
    build_tiny_causal_lm(snapshot, CORPUS)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c" * 40)
    data = hub / "datasets--acme--prefs" / "snapshots" / ("d" * 40) / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    sample = source_path(SourceConfig(builtin="sample")).read_text().splitlines()
    assert BUILTIN["sample"] and len(sample) > 60
    data.write_text("\n".join(sample[:60]) + "\n")
    (hub / "datasets--acme--prefs" / "refs").mkdir()
    (hub / "datasets--acme--prefs" / "refs" / "main").write_text("d" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("CREDITFLOW_MODEL_CACHE", str(tmp_path / "models"))  # where the merged policy is built

    cfg = _config(sources=[{"hf": "acme/prefs"}], tokenizer="acme/tiny-lm", rules={"max_length": 512})
    cfg["reference_model"] = "acme/tiny-lm"
    cfg["policy"]["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "save_merged": False}
    cfg["policy"]["loss"]["alpha"] = 0.25
    workspace = tmp_path / "ws"
    stages = pipeline_flow(config=cfg, workspace=str(workspace), progress=False)["stages"]
    assert stages["curate"]["manifest"]["inputs"]["sources"] == [f"hub:acme/prefs@{'d' * 40}"]
    assert stages["token_rewards"]["manifest"]["inputs"]["reference_model"]["revision"] == "c" * 40
    # Pinned at the start of the run: the manifests name the commits every stage loaded.
    assert stages["token_rewards"]["manifest"]["config"]["reference_model"] == f"acme/tiny-lm@{'c' * 40}"
    assert stages["curate"]["manifest"]["config"]["tokenizer"] == f"acme/tiny-lm@{'c' * 40}"
    assert stages["curate"]["manifest"]["config"]["sources"][0]["revision"] == "d" * 40
    assert stages["evaluate"]["manifest"]["metrics"]["prompts"] > 0
    policy_files = stages["policy"]["manifest"]["outputs"]
    assert "adapter/adapter_model.safetensors" in policy_files and not any(f.startswith("model/") for f in policy_files)

    # Exported folders load with the standard classes and carry a card with YAML metadata.
    cli = CliRunner()
    result = cli.invoke(app, ["export", "policy", "--out", str(tmp_path / "policy"), "-w", str(workspace)])
    assert result.exit_code == 0, result.output
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert len(list((tmp_path / "models").glob("merged-*"))) == 1  # merged for evaluate, reused by export
    card = (tmp_path / "policy" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "acme/tiny-lm" and meta["datasets"] == ["acme/prefs"]
    assert meta["library_name"] == "transformers" and {"creditflow", "dpo", "t-reg", "lora"} <= set(meta["tags"])
    assert meta["creditflow"]["alpha"] == cfg["policy"]["loss"]["alpha"] and meta["creditflow"]["loss"] == "dpo"
    assert "final_loss" in {m["name"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert "tokens_per_s" not in card and "lora:" in card  # no timings (they would move the digest); the config
    parsed = ModelCard.load(tmp_path / "policy" / "README.md")  # the Hub's parser: valid model-index metadata
    assert parsed.data.eval_results[0].dataset_type == "acme/prefs" and parsed.data.pipeline_tag == "text-generation"
    result = cli.invoke(
        app, ["export", "policy", "--adapter", "--out", str(tmp_path / "adapter"), "-w", str(workspace)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "acme/tiny-lm"
    )
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(ids).logits, policy.eval()(ids).logits, atol=1e-5, rtol=1e-4)
    result = cli.invoke(app, ["export", "reward_model", "--out", str(tmp_path / "rm"), "-w", str(workspace)])
    assert result.exit_code == 0 and "bradley-terry" in (tmp_path / "rm" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "rm" / "README.md").data.pipeline_tag == "text-classification"
    # An existing folder is refused, not overwritten; an unknown run is named.
    result = cli.invoke(app, ["export", "policy", "--out", str(tmp_path / "policy"), "-w", str(workspace)])
    assert result.exit_code != 0 and "exists and is not an empty folder" in result.output
    result = cli.invoke(app, ["export", "policy", "--run", "nope", "--out", str(tmp_path / "x"), "-w", str(workspace)])
    assert result.exit_code != 0 and "no policy stage run in run 'nope'" in result.output
    # Files others can read (not 0600), as the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    private = [
        p
        for p in [*workspace.joinpath("artifacts").rglob("*"), *tmp_path.joinpath("models").rglob("*")]
        if p.is_file() and p.stat().st_mode & 0o044 & ~umask != 0o044 & ~umask
    ]
    assert not private, private[:3]

    cfg["reference_model"] = "acme/not-cached"
    with pytest.raises(ValueError, match=r"reference_model: hub model 'acme/not-cached' is not in the Hugging Face"):
        pipeline_flow(config=cfg, workspace=str(workspace), progress=False)


def test_the_rl_stage_trains_next_to_dpo_and_evaluate_compares_them(tmp_path):
    """rl.enabled: an RL policy from the reference (ABC rewards from the trained RM; an adapter-only LoRA, merged
    when read), cached, evaluated, exported; `creditflow stage rl` without a reward model names what is missing;
    then GRPO on the DPO policy's implicit reward (RTO) and a reward function, the stage run alone."""
    from transformers import AutoModelForCausalLM

    from creditflow.flows.export import export_model
    from creditflow.flows.pipeline import rl_flow

    cfg = _config(sources=[{"builtin": "sample", "limit": 60}])
    cfg["rl"].update(
        enabled=True,
        max_steps=2,
        batch_size=4,
        samples_per_prompt=2,
        learning_rate=1e-3,
        sampling={"max_new_tokens": 8},
        lora={"r": 4, "target_modules": ["q_proj", "v_proj"], "save_merged": False},
    )
    workspace = tmp_path / "ws"
    curate_flow(config=cfg, workspace=str(workspace), progress=False)
    missing_rm = r"stage 'rl' needs the 'reward_model' artifact .*creditflow stage reward_model"
    with pytest.raises(StageNotReady, match=missing_rm):
        rl_flow(config=cfg, workspace=str(workspace), progress=False)
    stages = pipeline_flow(config=cfg, workspace=str(workspace), progress=False)["stages"]
    rl = stages["rl"]["manifest"]
    assert rl["metrics"]["iterations"] == 2 and rl["row_counts"]["samples"] == 2 * 4 * 2
    assert {"reward", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction"} <= set(
        pq.read_table(workspace / "artifacts" / "rl" / rl["fingerprint"] / "train_log.parquet").column_names
    )
    metrics = stages["evaluate"]["manifest"]["metrics"]
    assert {"rm_score.rl", "win_rate_rm.rl", "gold_score.rl", "rm_score.policy"} <= set(metrics)
    assert not (workspace / "artifacts" / "rl" / rl["fingerprint"] / "model").exists()
    exported = export_model(Workspace.resolve(str(workspace)), "rl", tmp_path / "rl_out")
    assert exported.joinpath("README.md").is_file() and AutoModelForCausalLM.from_pretrained(exported)
    again = pipeline_flow(config=cfg, workspace=str(workspace), progress=False)["stages"]
    assert again["rl"]["cache_hit"] and again["evaluate"]["cache_hit"]

    # RTO with GRPO and a verifiable reward: the stage now reads the DPO policy, and its digest covers it
    assert "policy" not in rl["inputs"]["upstream"]
    cfg["rl"].update(algorithm="grpo", reward_source="dpo_implicit", reward_functions=["test_rl:good_word_reward"])
    rto = rl_flow(config=cfg, workspace=str(workspace), progress=False)["manifest"]
    policy = stages["policy"]["manifest"]
    assert rto["inputs"]["upstream"]["policy"] == policy["digest"] and "test_rl:good_word_reward" in str(rto["inputs"])
    assert rto["metrics"]["iterations"] == 2 and rto["fingerprint"] != rl["fingerprint"]
