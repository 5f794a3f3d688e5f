"""Artifact store, catalog, fingerprints and config: no Prefect server needed."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from conftest import publish_artifact

from creditflow.flows.config import ConfigError, PipelineConfig, load_config
from creditflow.flows.registry import pin_hub_revisions
from creditflow.flows.stages import plan_stage
from creditflow.storage.artifacts import ArtifactError, ArtifactStore
from creditflow.storage.catalog import Catalog
from creditflow.storage.hashing import reached_modules, table_modules
from creditflow.tasks.models.tiny import build_tiny_tokenizer


def _publish(store, fingerprint="f" * 24, rows=3, replace=False, **extra):
    writer = store.writer("curate", fingerprint)
    writer.write_table("pairs", pa.table({"pair_id": [f"p{i}" for i in range(rows)], "x": list(range(rows))}))
    return store.publish(
        writer,
        stage="curate",
        fingerprint=fingerprint,
        inputs={"sources": ["abc"]},
        config={"k": 1},
        code_version="v",
        replace=replace,
        **extra,
    )


def test_publish_is_atomic_and_manifest_describes_outputs(tmp_path):
    store = ArtifactStore(tmp_path)
    writer = store.writer("curate", "a" * 24)
    writer.write_table("pairs", pa.table({"x": [1, 2]}))
    assert not store.exists("curate", "a" * 24)  # invisible until published
    manifest = store.publish(
        writer,
        stage="curate",
        fingerprint="a" * 24,
        inputs={},
        config={},
        code_version="v",
        metrics={"m": 1.0},
        mlflow_run_id="r1",
    )
    assert store.exists("curate", "a" * 24)
    assert manifest.row_counts == {"pairs": 2} and manifest.outputs["pairs.parquet"]["rows"] == 2
    assert manifest.mlflow_run_id == "r1" and manifest.metrics == {"m": 1.0} and manifest.created_at
    assert store.load("curate", "a" * 24) == manifest
    assert store.read_table(manifest, "pairs").column("x").to_pylist() == [1, 2]
    assert not list((tmp_path / "curate").glob(".tmp-*"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names each fsynced fd through /proc")
def test_publish_syncs_outputs_and_folders_to_disk(tmp_path, monkeypatch):
    """After an OS crash a manifest must not vouch for outputs still in the page cache: publish fsyncs every output
    and folder before the manifest goes in, and the stage folder after the rename."""
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = ArtifactStore(tmp_path)
    writer = store.writer("policy", "a" * 24)
    writer.write_table("train_log", pa.table({"x": [1]}))
    (writer.dir / "model").mkdir()
    (writer.dir / "model" / "model.safetensors").write_bytes(b"weights")
    manifest = store.publish(writer, stage="policy", fingerprint="a" * 24, inputs={}, config={}, code_version="v")
    assert store.file(manifest, "model/model.safetensors").read_bytes() == b"weights"
    assert {"train_log.parquet", "model", "model.safetensors", writer.dir.name, "policy"} <= set(synced)


def test_digest_depends_on_content_only(tmp_path):
    store = ArtifactStore(tmp_path)
    one = _publish(store, "a" * 24)
    two = _publish(store, "b" * 24)
    three = _publish(store, "c" * 24, rows=4)
    assert one.digest == two.digest != three.digest
    assert store.find_by_digest("curate", three.digest).fingerprint == "c" * 24


def test_corrupted_or_missing_outputs_are_refused_with_the_path(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = _publish(store)
    path = store.path("curate", manifest.fingerprint) / "pairs.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"pairs\.parquet: content does not match"):
        store.read_table(manifest, "pairs")
    path.unlink()
    with pytest.raises(ArtifactError, match=r"pairs\.parquet: missing"):
        store.read_table(manifest, "pairs")
    with pytest.raises(ArtifactError, match="no output 'nope.parquet'"):
        store.read_table(manifest, "nope")
    with pytest.raises(ArtifactError, match="no curate artifact with fingerprint"):
        store.load("curate", "0" * 24)
    (store.path("curate", manifest.fingerprint) / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        store.load("curate", manifest.fingerprint)


def test_second_publisher_of_a_fingerprint_defers_unless_replacing(tmp_path):
    store = ArtifactStore(tmp_path)
    first = _publish(store, mlflow_run_id="first")
    second = _publish(store, rows=5, mlflow_run_id="second")
    assert second == first  # same fingerprint = same inputs: the published artifact wins, ours is discarded
    replaced = _publish(store, rows=5, mlflow_run_id="third", replace=True)
    assert replaced.mlflow_run_id == "third" and store.load("curate", "f" * 24).row_counts == {"pairs": 5}
    assert sorted(p.name for p in (tmp_path / "curate").iterdir() if not p.name.endswith(".lock")) == ["f" * 24]


def test_sigkilled_writer_leaves_no_artifact_and_is_swept(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, pyarrow as pa
        from creditflow.storage.artifacts import ArtifactStore
        store = ArtifactStore({str(tmp_path)!r})
        writer = store.writer("curate", "{"d" * 24}")
        writer.write_table("pairs", pa.table({{"x": list(range(1000))}}))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    store = ArtifactStore(tmp_path)
    assert not store.exists("curate", "d" * 24)
    assert len(list((tmp_path / "curate").glob(".tmp-*"))) == 1
    assert store.sweep_stale_tmp("curate") == 1
    assert not list((tmp_path / "curate").glob(".tmp-*"))


def test_catalog_views_span_artifacts_and_record_runs(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    _publish(store, "a" * 24, rows=2)
    _publish(store, "b" * 24, rows=3)
    catalog = Catalog(tmp_path / "catalog.duckdb", store)
    assert catalog.refresh().views == ["curate_pairs"]
    catalog.record_stage_run(
        pipeline_run_id="p",
        mlflow_run_id="m",
        stage="curate",
        fingerprint="a" * 24,
        digest="d",
        cache_hit=True,
        row_counts={"pairs": 2},
    )
    columns, rows = catalog.query("SELECT fingerprint, count(*) FROM curate_pairs GROUP BY fingerprint ORDER BY 1")
    assert columns == ["fingerprint", "count_star()"] and rows == [("a" * 24, 2), ("b" * 24, 3)]
    assert catalog.query("SELECT stage, cache_hit FROM stage_runs")[1] == [("curate", True)]
    assert catalog.query("SELECT count(*) FROM artifacts")[1] == [(2,)]
    # Views follow the store: a removed artifact disappears on refresh, and a stage with no artifacts has no view.
    import shutil

    shutil.rmtree(store.path("curate", "a" * 24))
    catalog.refresh()
    assert catalog.query("SELECT count(*) FROM curate_pairs")[1] == [(3,)]
    shutil.rmtree(store.path("curate", "b" * 24))
    assert catalog.refresh().views == []
    with duckdb.connect(str(tmp_path / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'curate_pairs'").fetchone()[0] == 0


def test_concurrent_processes_share_one_catalog(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from creditflow.storage.artifacts import ArtifactStore
        from creditflow.storage.catalog import Catalog
        catalog = Catalog({str(tmp_path / "catalog.duckdb")!r}, ArtifactStore({str(tmp_path / "artifacts")!r}))
        for i in range(15):
            catalog.record_stage_run(pipeline_run_id=sys.argv[1], mlflow_run_id=str(i), stage="curate",
                                     fingerprint="f", digest="d", cache_hit=False, row_counts={{}})
            catalog.refresh()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    catalog = Catalog(tmp_path / "catalog.duckdb", ArtifactStore(tmp_path / "artifacts"))
    assert catalog.query("SELECT pipeline_run_id, count(*) FROM stage_runs GROUP BY 1 ORDER BY 1")[1] == [
        ("a", 15),
        ("b", 15),
    ]


def test_fingerprint_covers_every_row_affecting_knob(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    tok_a = tmp_path / "tok_a"
    tok_b = tmp_path / "tok_b"
    build_tiny_tokenizer(tok_a, ["hello world"] * 5, vocab_size=300)
    build_tiny_tokenizer(tok_b, ["another corpus entirely"] * 5, vocab_size=300)
    benchmark = tmp_path / "alpaca_eval.jsonl"
    benchmark.write_text(json.dumps({"instruction": "a benchmark prompt"}) + "\n")

    def fingerprint(**curate):
        cfg = load_config(
            None, {"curate.sources": [{"path": str(data)}], **{f"curate.{k}": v for k, v in curate.items()}}
        )
        return plan_stage("curate", cfg, {}).fingerprint

    base = fingerprint()
    assert fingerprint() == base
    variants = [
        fingerprint(eval_fraction=0.2),
        fingerprint(split_seed=1),
        fingerprint(rules={"dedupe": False}),
        fingerprint(rules={"min_margin": None}),
        fingerprint(tokenizer=str(tok_a), rules={"max_length": 64}),
        fingerprint(tokenizer=str(tok_b), rules={"max_length": 64}),
        fingerprint(tokenizer=str(tok_a), rules={"max_length": 65}),
        fingerprint(rules={"near_duplicates": True}),
        fingerprint(rules={"near_duplicate_threshold": 0.7}),
        fingerprint(decontaminate=[str(benchmark)]),
        fingerprint(decontaminate=[str(benchmark)], decontaminate_ngram=8),
    ]
    assert len({base, *variants}) == len(variants) + 1
    benchmark.write_text(json.dumps({"instruction": "another benchmark prompt"}) + "\n")
    assert fingerprint(decontaminate=[str(benchmark)]) != variants[-2]  # the benchmark's content counts
    data.write_text(data.read_text() + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert fingerprint() != base
    # Not row-affecting: experiment name and workspace.
    cfg = load_config(None, {"curate.sources": [{"path": str(data)}], "experiment": "x", "workspace": "/elsewhere"})
    assert plan_stage("curate", cfg, {}).fingerprint == fingerprint()


def test_config_errors_name_the_key_and_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    config = tmp_path / "sub" / "c.yaml"
    config.write_text(
        "curate:\n  sources:\n    - path: ../data.jsonl\n  decontaminate: [mt_bench.jsonl]\n"
        "  rules:\n    dedupe: false\n"
    )
    cfg = load_config(config)
    assert cfg.curate.sources[0].path == str(tmp_path / "data.jsonl")
    assert cfg.curate.decontaminate == [str(tmp_path / "sub" / "mt_bench.jsonl")]
    assert cfg.curate.rules.dedupe is False and cfg.curate.rules.drop_ties is True
    assert isinstance(load_config(None), PipelineConfig)

    config.write_text("curate:\n  rules:\n    max_lenght: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: curate\.rules\.max_lenght: unknown key"):
        load_config(config)
    config.write_text("curate:\n  eval_fraction: lots\n")
    with pytest.raises(ConfigError, match=r"curate\.eval_fraction: expected float, got str"):
        load_config(config)
    config.write_text("curate:\n  rules:\n    dedupe: 1\n")
    with pytest.raises(ConfigError, match=r"curate\.rules\.dedupe: expected bool"):
        load_config(config)
    config.write_text("curate:\n  sources:\n    - {path: a.jsonl, hf: b}\n")
    with pytest.raises(ConfigError, match=r"curate\.sources\[0\]: a source needs exactly one of path/hf/builtin"):
        load_config(config)
    config.write_text("curate:\n  rules: {max_length: 10}\n")
    with pytest.raises(ConfigError, match="token limits need curate.tokenizer"):
        load_config(config)
    config.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(config)


def test_an_unknown_capitalised_key_is_named_with_its_sections_known_keys(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("policy: {Seed: 1}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: policy\.Seed: unknown key \(known: batch_size, .*seed"):
        load_config(config)


def test_a_section_given_as_a_list_is_a_config_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("audit: [x]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: audit: expected a mapping, got list"):
        load_config(config)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"experiment: caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"c\.yaml: 'utf-8' codec can't decode"):
        load_config(config)


def test_a_plugin_gold_scorers_source_is_in_the_evaluate_and_rl_fingerprints(tmp_path, tiny_lm_dir, monkeypatch):
    """The gold scorer writes the gold scores of evaluate's generations and rl's logged rollouts."""
    from creditflow.flows.registry import STAGES

    (tmp_path / "my_gold.py").write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = ArtifactStore(tmp_path / "artifacts")
    upstream = {stage: publish_artifact(store, stage, "0" * 24, {}) for stage in STAGES}

    def fingerprint(stage, scorer):
        cfg = load_config(None, {"reference_model": str(tiny_lm_dir), f"{stage}.gold_scorer": scorer})
        return plan_stage(stage, cfg, upstream).fingerprint

    before = {stage: fingerprint(stage, "my_gold:score") for stage in ("evaluate", "rl")}
    (tmp_path / "my_gold.py").write_text("def score(prompts, completions):\n    return [0.5] * len(completions)\n")
    for stage, old in before.items():
        assert fingerprint(stage, "my_gold:score") != old
    default = load_config(None, {"reference_model": str(tiny_lm_dir)})  # gold_scorer: vader, the stage's own code
    assert not any("gold_scorer" in plan_stage(stage, default, upstream).inputs for stage in before)


def test_model_fingerprint_covers_the_generation_config(tmp_path):
    """Sampled answers end at its EOS ids."""
    from creditflow.tasks.models.resolve import model_fingerprint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    without = model_fingerprint(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    with_eos_2 = model_fingerprint(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert len({without, with_eos_2, model_fingerprint(tmp_path)}) == 3


def test_code_version_is_the_source_as_first_hashed_in_this_process(tmp_path, monkeypatch):
    """Editing a stage's source mid-run must not change the fingerprints the running (old) code computes."""
    import importlib

    from creditflow.storage.hashing import code_version

    (tmp_path / "edited_stage.py").write_text("ROWS = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("edited_stage")
    before = code_version(["edited_stage"])
    (tmp_path / "edited_stage.py").write_text("ROWS = 2\n")
    assert code_version(["edited_stage"]) == before
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "from creditflow.storage.hashing import code_version as v; print(v(['edited_stage']))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert fresh != before  # a new process hashes the edited source


def test_code_digest_ignores_comments_docstrings_and_layout_but_not_code():
    from creditflow.storage.hashing import code_text

    source = 'def f(x):\n    """Twice x."""\n    return x * 2  # doubled\n\n\nTEMPLATE = "{x}!"\n'
    reworded = (
        '# a header\ndef f(x):\n    """Two times x, said another way."""\n'
        '    return (x *\n            2)\n\nTEMPLATE = "{x}!"\n'
    )
    assert code_text(reworded) == code_text(source)
    assert code_text(source.replace("x * 2", "x * 3")) != code_text(source)
    assert code_text(source.replace('"{x}!"', '"{x}?"')) != code_text(source)  # a string that is not a docstring
    only_docstring = 'def g():\n    """Nothing else."""\n'
    assert code_text(only_docstring) == code_text("def g():\n    pass\n")


def test_config_reads_yaml12_floats_and_checks_ranges(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("policy:\n  learning_rate: 1e-4\n  loss: {beta: 5E-2}\nreward_model:\n  learning_rate: 3\n")
    cfg = load_config(config)
    assert cfg.policy.learning_rate == 1e-4 and cfg.policy.loss.beta == 0.05 and cfg.reward_model.learning_rate == 3.0
    with pytest.raises(ConfigError, match=r"curate\.eval_fraction: expected float, got str '0\.2'"):
        load_config(None, {"curate.eval_fraction": "0.2"})
    for key, value, message in [
        ("policy.learning_rate", 0.0, "greater than 0"),
        ("policy.learning_rate", float("nan"), "finite"),
        ("onpolicy.temperature", -0.5, "greater than or equal to 0"),
        ("policy.warmup_ratio", 1.5, "less than or equal to 1"),
        ("curate.eval_fraction", 1.0, "less than 1"),
        ("token_rewards.abc_beta", 2.0, "less than or equal to 1"),
        ("policy.loss.loss_type", "kto", "'dpo', 'ipo' or 'simpo'"),
        ("token_rewards.better_template", "{instruction}", "need token_rewards.template: custom"),
    ]:
        with pytest.raises(ConfigError, match=rf"{re.escape(key.rsplit('.', 1)[0])}.*{message}"):
            load_config(None, {key: value})
    guideline = "{instruction}\n\nYour response should be helpful."
    custom = {"token_rewards.template": "custom", "token_rewards.worse_template": guideline}
    cfg = load_config(None, {**custom, "token_rewards.better_template": guideline})
    assert cfg.token_rewards.templates() == (guideline, guideline)  # neither embeds the response: allowed
    for better, message in [
        ("{instruction} {answer}", r"placeholders are \{instruction\}"),
        ("{instruction} {response}", "both templates embed {response}, or neither"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, {**custom, "token_rewards.better_template": better})
    with pytest.raises(ConfigError, match="template custom needs both"):
        load_config(None, {"token_rewards.template": "custom"})


def test_set_values_parse_as_yaml_and_bad_ones_are_named():
    from creditflow.flows.config import parse_overrides

    assert parse_overrides(["policy.learning_rate=1e-4", "curate.tokenizer=null", "a.b=[x, y]"]) == {
        "policy.learning_rate": 1e-4,
        "curate.tokenizer": None,
        "a.b": ["x", "y"],
    }
    with pytest.raises(ConfigError, match=r"--set policy.lora: '\{r: ' is not a YAML value"):
        parse_overrides(["policy.lora={r: "])
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_overrides(["policy.lora"])


def test_config_commands_import_no_ml_stack():
    """`creditflow --help`, `creditflow config` and config validation stay light (no torch, transformers, peft,
    MLflow or Prefect): the measured time is in docs/benchmarks.md."""
    probe = (
        "import sys; from typer.testing import CliRunner; from creditflow.flows.cli import app; "
        "r = CliRunner().invoke(app, ['config', '--set', 'policy.learning_rate=1e-4']); "
        "assert r.exit_code == 0, r.output; "
        "r = CliRunner().invoke(app, ['config', '--explain']); assert 'reference_model' in r.output; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'mlflow', 'prefect') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "command", [["run"], ["runs"], ["status"], ["down"], ["catalog", "refresh"], ["artifacts", "gc", "--keep", "1"]]
)
def test_a_workspace_that_is_a_file_is_one_line_error(tmp_path, command):
    from typer.testing import CliRunner

    from creditflow.flows.cli import app

    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("x")
    result = CliRunner().invoke(app, [*command, "-w", str(not_a_folder)])
    assert result.exit_code == 2, result.output
    assert f"error: workspace {not_a_folder} is a file" in result.output
    assert "Traceback" not in result.output


def test_volatile_outputs_are_checked_but_not_in_the_digest(tmp_path):
    store = ArtifactStore(tmp_path)
    digests = []
    for fingerprint, seconds in (("a" * 24, 1.5), ("b" * 24, 9.0)):
        writer = store.writer("policy", fingerprint)
        writer.write_table("train_log", pa.table({"step": [1], "loss": [0.5]}))
        writer.write_table("train_timings", pa.table({"step": [1], "tokens_per_s": [seconds]}), volatile=True)
        manifest = store.publish(
            writer, stage="policy", fingerprint=fingerprint, inputs={}, config={}, code_version="v"
        )
        assert manifest.outputs["train_timings.parquet"]["volatile"] is True
        digests.append(manifest.digest)
    assert digests[0] == digests[1]  # same content, other timings
    (store.path("policy", "a" * 24) / "train_timings.parquet").write_bytes(b"edited")
    with pytest.raises(ArtifactError, match="does not match its manifest digest"):
        store.read_table(store.load("policy", "a" * 24), "train_timings")


def _record(catalog, run, fingerprint="a" * 24):
    catalog.record_stage_run(
        pipeline_run_id=run,
        mlflow_run_id="m",
        stage="curate",
        fingerprint=fingerprint,
        digest="d",
        cache_hit=False,
        row_counts={"pairs": 2},
    )


def test_a_lost_or_garbage_catalog_is_rebuilt_with_its_run_history(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    _publish(store, "a" * 24, rows=2)
    catalog = Catalog(tmp_path / "catalog.duckdb", store)
    for run in ("p1", "p2"):
        _record(catalog, run)
    (tmp_path / "catalog.duckdb").unlink()
    report = catalog.refresh()
    assert catalog.query("SELECT list(pipeline_run_id ORDER BY pipeline_run_id) FROM stage_runs")[1] == [
        (["p1", "p2"],)
    ]
    (tmp_path / "catalog.duckdb").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RuntimeError, match="not a readable DuckDB catalog"):
        catalog.query("SELECT 1")  # named, not "locked by another process"
    report = catalog.refresh()
    assert report.moved_aside is not None and report.moved_aside.read_bytes().startswith(b"this is not")
    assert catalog.query("SELECT count(*) FROM stage_runs")[1] == [(2,)] and report.views == ["curate_pairs"]


def test_refresh_names_and_skips_a_truncated_manifest(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    _publish(store, "a" * 24, rows=2)
    _publish(store, "b" * 24, rows=3)
    manifest = store.path("curate", "b" * 24) / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    report = Catalog(tmp_path / "catalog.duckdb", store).refresh()
    assert report.views == ["curate_pairs"] and len(report.skipped) == 1 and str(manifest) in report.skipped[0]


def test_refresh_names_and_skips_non_utf8_manifests_cut_parquet_and_bad_run_log_lines(tmp_path):
    """Each bad file is named and left out; the rest of the catalog (and every later refresh) still works."""
    store = ArtifactStore(tmp_path / "artifacts")
    for fingerprint in ("a" * 24, "b" * 24, "c" * 24):
        _publish(store, fingerprint, rows=2)
    bad_manifest = store.path("curate", "b" * 24) / "manifest.json"
    bad_manifest.write_bytes(b'{"stage": "\xff\xfe"}')
    cut = store.path("curate", "c" * 24) / "pairs.parquet"
    cut.write_bytes(cut.read_bytes()[:-20])
    catalog = Catalog(tmp_path / "catalog.duckdb", store)
    _record(catalog, "p1")
    with open(catalog.run_log, "ab") as log:
        log.write(b'{"stage": "\xff"}\n')
    _record(catalog, "p2")
    report = catalog.refresh()
    assert [reason.split(":")[0] for reason in report.skipped] == [str(bad_manifest), str(cut), str(catalog.run_log)]
    assert "line 2: not a run record" in report.skipped[2]
    assert catalog.query("SELECT count(*), min(fingerprint) FROM curate_pairs")[1] == [(2, "a" * 24)]
    assert catalog.query("SELECT count(*) FROM stage_runs")[1] == [(2,)]


def test_user_sql_is_one_read_only_select_inside_the_store(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    _publish(store, "a" * 24, rows=2)
    catalog = Catalog(tmp_path / "catalog.duckdb", store)
    catalog.refresh()
    assert catalog.query_user("SELECT count(*) FROM curate_pairs")[1] == [(2,)]
    pairs = store.path("curate", "a" * 24) / "pairs.parquet"
    before = pairs.read_bytes()
    for sql, message in [
        (f"COPY (SELECT 1 AS x) TO '{pairs}' (FORMAT parquet)", "one SELECT statement"),
        (f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'", "one SELECT statement"),
        (f"EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{pairs}' (FORMAT parquet)", "one SELECT statement"),
        ("SELECT 1; DROP VIEW curate_pairs", "one SELECT statement"),
        ("CREATE TABLE t AS SELECT 1", "one SELECT statement"),
        ("SELECT * FROM read_text('/etc/hostname')", "Permission Error"),
        ("SET enable_external_access = true", "one SELECT statement"),
        ("SELEC 1", "syntax error"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            catalog.query_user(sql)
    assert pairs.read_bytes() == before and not (tmp_path / "out.csv").exists()


def _hub_cache(root, repo: str, commit: str = "a" * 40, branch: str = "main"):
    """A tiny model written into a Hugging Face cache in the hub's own layout (refs/<branch> -> snapshots/<commit>)."""
    from creditflow.tasks.models.tiny import build_tiny_causal_lm

    folder = root / ("models--" + repo.replace("/", "--"))
    build_tiny_causal_lm(folder / "snapshots" / commit, ["the hub layout, offline"] * 20, seed=int(commit[0], 16))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / branch).write_text(commit)
    return folder / "snapshots" / commit


def test_hub_ids_resolve_offline_from_the_hf_cache_and_a_moved_branch_is_a_miss(tmp_path, monkeypatch):
    from creditflow.tasks.models.resolve import resolve_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = _hub_cache(tmp_path / "hub", "acme/tiny-lm")
    assert resolve_model("acme/tiny-lm") == first
    assert resolve_model(f"acme/tiny-lm@{'a' * 40}") == first

    def fingerprint(cfg=None):
        cfg = cfg or load_config(None, {"reference_model": "acme/tiny-lm"})
        return plan_stage("onpolicy", cfg, {"curate": c, "reward_model": r})

    store = ArtifactStore(tmp_path / "artifacts")
    c, r = _publish(store), _publish(store, "e" * 24)
    before = fingerprint()
    assert before.inputs["reference_model"]["revision"] == "a" * 40
    # A run pins the branch to its commit once; what it hands on keeps naming that snapshot after the branch moves.
    pinned, pinned_cfg = pin_hub_revisions({"reference_model": "acme/tiny-lm"})
    assert pinned == {"reference_model": f"acme/tiny-lm@{'a' * 40}"}
    assert pinned_cfg.reference_model == pinned["reference_model"]
    assert pin_hub_revisions(pinned)[0] == pinned
    pinned_before = fingerprint(pinned_cfg)
    _hub_cache(tmp_path / "hub", "acme/tiny-lm", commit="b" * 40)  # the branch moves to new weights
    after = fingerprint()
    assert after.fingerprint != before.fingerprint and after.inputs["reference_model"]["revision"] == "b" * 40
    assert fingerprint(pinned_cfg).fingerprint == pinned_before.fingerprint
    assert resolve_model(pinned["reference_model"]) == first
    assert pin_hub_revisions({"reference_model": "acme/tiny-lm"})[0]["reference_model"].endswith("@" + "b" * 40)

    for spec, message in [
        (
            "acme/missing",
            r"reference_model: hub model 'acme/missing' is not in the Hugging Face cache .* HF_HUB_OFFLINE=1",
        ),
        ("acme/tiny-lm@nope", r"reference_model: hub model 'acme/tiny-lm@nope' .* or check the revision"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_stage("onpolicy", load_config(None, {"reference_model": spec}), {"curate": c, "reward_model": r})


def test_the_reward_model_backbone_and_the_tokenizer_take_hub_ids_too(tmp_path, monkeypatch):
    """The other two model keys go through the same resolver: pinned to their commit once, fingerprinted by the
    snapshot's files with the revision recorded."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(tmp_path / "hub", "acme/tiny-lm")
    config = {"reward_model": {"base_model": "acme/tiny-lm"}, "curate": {"tokenizer": "acme/tiny-lm"}}
    pinned, cfg = pin_hub_revisions(config)
    commit = "a" * 40
    assert pinned["reward_model"]["base_model"] == pinned["curate"]["tokenizer"] == f"acme/tiny-lm@{commit}"
    store = ArtifactStore(tmp_path / "artifacts")
    plan = plan_stage("reward_model", cfg, {"curate": _publish(store)})
    assert plan.inputs["base_model"]["revision"] == commit and plan.inputs["base_model"]["weights"]
    curate = plan_stage("curate", cfg, {})  # the tokenizer's files are hashed, its pinned spec is in the config
    assert curate.inputs["tokenizer"] and curate.config["tokenizer"] == f"acme/tiny-lm@{commit}"


def test_every_bundled_recipe_validates_and_says_what_it_is_for_and_how_to_launch_it():
    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(recipes) >= 6
    for recipe in recipes:
        text = recipe.read_text()
        header = [line for line in text.splitlines() if line.startswith("#")]
        assert header and text.startswith("#"), recipe.name
        assert any("Launch" in line or "creditflow " in line for line in header), recipe.name
        load_config(recipe)  # strict: an unknown or misspelled key fails here


def test_a_stage_hashes_every_module_its_recipe_reaches():
    """Stage fingerprints cover the recipe's imports, transitively, derived from the source (no list to keep)."""
    from creditflow.flows.recipes import RECIPES
    from creditflow.flows.registry import STAGES, recipe_modules
    from creditflow.tasks.recipes.token_rewards import SOURCES

    def hashed(name: str) -> set[str]:
        return {m.removeprefix("creditflow.") for m in STAGES[name].code_modules()}

    # The tables hold functions; planning reads their modules from source without importing them: the same.
    assert recipe_modules() == {name: recipe.__module__ for name, recipe in RECIPES.items()}
    assert table_modules(recipe_modules()["token_rewards"], "SOURCES") == {k: f.__module__ for k, f in SOURCES.items()}
    # top level, `from package import module`, and imports inside functions (reward_model's tiny backbone)
    assert {
        "tasks.recipes.reward_model",
        "tasks.train.checkpoint",
        "tasks.train.fsdp",
        "tasks.infer.reward_scoring",
        "tasks.data.schema",
        "tasks.models.tiny",
    } <= hashed("reward_model")
    assert {
        "tasks.credit.contrastive",
        "tasks.credit.attention_credit",
        "tasks.models.logprobs",
        "tasks.models.precision",
        "storage.token_cache",
    } <= hashed("token_rewards")
    assert {"tasks.recipes.audit", "tasks.credit.audit_probes", "tasks.data.ingest"} <= hashed("audit")  # two deep
    assert {"tasks.losses.rl", "tasks.credit.rl_rewards", "tasks.infer.generation", "tasks.infer.gold"} <= hashed("rl")
    assert "tasks.recipes.policy" not in hashed("evaluate")  # a trained policy is an upstream artifact, not code
    assert not any(m.startswith("flows.") for name in STAGES for m in hashed(name))


def _plan_token_rewards(tmp_path, reference, sources: list[str]):
    from creditflow.flows.config import validate
    from creditflow.flows.stages import plan_stage
    from creditflow.storage.workspace import Workspace

    store = Workspace.resolve(tmp_path / "ws").store
    table = {"t": pa.table({"x": [1]})}
    upstream = {
        stage: store.load(stage, stage) if store.exists(stage, stage) else publish_artifact(store, stage, stage, table)
        for stage in ("curate", "reward_model")
    }
    cfg = validate({"reference_model": str(reference), "token_rewards": {"sources": sources}})
    return plan_stage("token_rewards", cfg, upstream)


@pytest.fixture
def edited_source(monkeypatch):
    """Simulate an edit of one module's source file, as the digests read it (read once per process: cleared)."""
    from creditflow.storage import hashing

    edits = {}
    read = hashing.module_source

    def source(module: str) -> str:
        return edits.get(module, read(module))

    def forget() -> None:
        hashing._source_digest.cache_clear()
        hashing.imported_modules.cache_clear()

    def edit(module: str, change) -> None:
        edits[module] = change(read(module))
        forget()

    monkeypatch.setattr(hashing, "module_source", source)
    yield edit
    forget()


def test_token_reward_fingerprint_covers_abc_code_only_when_abc_is_a_source(tmp_path, tiny_lm_dir, edited_source):
    abc_module = "creditflow.tasks.credit.attention_credit"

    def fingerprints():
        return {
            sources: _plan_token_rewards(tmp_path, tiny_lm_dir, list(sources)).fingerprint
            for sources in (("contrastive",), ("contrastive", "abc"))
        }

    before = fingerprints()
    # A function only the ABC path reaches: its code changes, so do the rows of the configs that use ABC.
    edited_source(abc_module, lambda text: text.replace("def score_abc(", "def score_abc(*_unused, ", 1))
    after = fingerprints()
    assert after[("contrastive",)] == before[("contrastive",)]
    assert after[("contrastive", "abc")] != before[("contrastive", "abc")]
    # The ABC rows' own cache key (a knob of the source) follows the same code.
    assert abc_module in reached_modules([abc_module])


def test_a_docstring_or_comment_edit_changes_no_fingerprint(tmp_path, tiny_lm_dir, edited_source):
    before = _plan_token_rewards(tmp_path, tiny_lm_dir, ["contrastive", "abc"]).fingerprint
    for module in ("creditflow.tasks.credit.attention_credit", "creditflow.tasks.recipes.token_rewards"):
        edited_source(module, lambda text: text.replace('"""', '"""Reworded. ', 1) + "\n# a new comment\n")
    assert _plan_token_rewards(tmp_path, tiny_lm_dir, ["contrastive", "abc"]).fingerprint == before


def test_an_experiment_name_from_any_caller_cannot_leave_the_workspace(tmp_path):
    """Configs validate the experiment name; the tracking layer does too, for the CLI options that name one."""
    from creditflow.storage.tracking import Run
    from creditflow.storage.workspace import Workspace

    workspace = Workspace.resolve(tmp_path / "ws")
    for name in ("../../escaped", "a/b", ".."):
        with pytest.raises(ValueError, match="no '/', no '..'"):
            Run.start(workspace, name, "audit")
    assert not (tmp_path / "escaped").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ws"]


def test_experiments_open_in_mlflows_training_view_with_a_description(tmp_path):
    """MLflow 3's UI picks an experiment's view by its kind: CreditFlow's are model-training experiments."""
    from creditflow.storage.tracking import EXPERIMENT_TAGS, Run, client_for
    from creditflow.storage.workspace import Workspace

    workspace = Workspace.resolve(tmp_path / "ws")
    run = Run.start(workspace, "kinds", "a run")
    run.end()
    tags = client_for(workspace).get_experiment_by_name("kinds").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"] == EXPERIMENT_TAGS["mlflow.note.content"]
