"""Artifact garbage collection on real published artifacts and a real catalog (no Prefect server needed)."""

import threading
import time

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from creditflow.flows.cli import app
from creditflow.storage.catalog import Catalog
from creditflow.storage.gc import collect_garbage
from creditflow.storage.workspace import Workspace


def _publish(ws: Workspace, stage: str, fingerprint: str, rows: int, upstream: dict | None = None):
    writer = ws.store.writer(stage, fingerprint)
    writer.write_table("pairs", pa.table({"x": list(range(rows))}))
    return ws.store.publish(
        writer,
        stage=stage,
        fingerprint=fingerprint,
        inputs={"upstream": {u: m.digest for u, m in (upstream or {}).items()}},
        config={},
        code_version="v",
    )


def _record(ws: Workspace, run: str | None, manifest, mlflow_run_id: str = "m") -> None:
    Catalog(ws.catalog_path, ws.store).record_stage_run(
        pipeline_run_id=run,
        mlflow_run_id=mlflow_run_id,
        stage=manifest.stage,
        fingerprint=manifest.fingerprint,
        digest=manifest.digest,
        cache_hit=False,
        row_counts=manifest.row_counts,
    )


@pytest.fixture
def history(tmp_path):
    """p1 (oldest), p2, then a standalone reward_model run s3 computed from p1's curate artifact; plus an orphan."""
    ws = Workspace.resolve(tmp_path / "ws")
    a = _publish(ws, "curate", "a" * 24, rows=2)
    x = _publish(ws, "reward_model", "x" * 24, rows=1, upstream={"curate": a})
    b = _publish(ws, "curate", "b" * 24, rows=3)
    y = _publish(ws, "reward_model", "y" * 24, rows=1, upstream={"curate": b})
    z = _publish(ws, "reward_model", "z" * 24, rows=4, upstream={"curate": a})
    _publish(ws, "curate", "o" * 24, rows=5)  # never recorded by any run
    for run, manifests in (("p1", [a, x]), ("p2", [b, y])):
        for m in manifests:
            _record(ws, run, m)
    _record(ws, None, z, mlflow_run_id="s3")
    (ws.prefect_results_dir / f"curate-{'b' * 24}").write_text("{}")  # the stage's cached Prefect result
    return ws


def _present(ws: Workspace) -> set[str]:
    return {m.fingerprint[0] for m in ws.store.manifests()}


def test_gc_keeps_recent_runs_and_their_upstream_and_removes_the_rest(history):
    ws = history
    sizes = {
        m.fingerprint[0]: sum(p.stat().st_size for p in ws.store.path(m.stage, m.fingerprint).rglob("*"))
        for m in ws.store.manifests()
    }

    dry = collect_garbage(ws, keep=2, dry_run=True)
    assert {fp[0] for _, fp, _ in dry.removed} == {"x", "o"}
    assert _present(ws) == set("abxyzo")  # nothing touched

    # The standalone run s3 and p2 are the two most recent; s3's reward model was computed from curate "a".
    report = collect_garbage(ws, keep=2)
    assert report.kept_runs == ["s3", "p2"]
    assert _present(ws) == set("abyz")
    assert report.bytes_freed == sizes["x"] + sizes["o"]
    for manifest in ws.store.manifests():
        assert ws.store.read_table(manifest, "pairs").num_rows == manifest.row_counts["pairs"]
    catalog = Catalog(ws.catalog_path, ws.store)
    assert catalog.query("SELECT count(*) FROM curate_pairs")[1] == [(5,)]  # a (2) + b (3): views refreshed
    assert catalog.query("SELECT list(fingerprint ORDER BY fingerprint) FROM artifacts")[1][0][0] == [
        "a" * 24,
        "b" * 24,
        "y" * 24,
        "z" * 24,
    ]
    assert catalog.query("SELECT count(*) FROM stage_runs")[1] == [(5,)]  # history stays

    report = collect_garbage(ws, keep=1)
    assert _present(ws) == set("az")
    assert not (ws.prefect_results_dir / f"curate-{'b' * 24}").exists()
    assert not [p for p in ws.artifacts_dir.rglob("*") if p.name.startswith((".trash-", ".tmp-"))]


def test_gc_spares_young_artifacts_by_default_on_the_cli(history):
    runner = CliRunner()
    young = runner.invoke(app, ["artifacts", "gc", "--keep", "1", "-w", str(history.root)])
    assert young.exit_code == 0, young.output
    assert "removed 0 artifacts" in young.output and _present(history) == set("abxyzo")

    out = runner.invoke(app, ["artifacts", "gc", "--keep", "1", "--min-age", "0", "-w", str(history.root)])
    assert out.exit_code == 0, out.output
    assert "removed 4 artifacts" in out.output and _present(history) == set("az")


def test_gc_waits_for_the_artifact_lock_a_publisher_holds(history):
    ws = history
    with ws.store.lock("curate", "o" * 24):
        worker = threading.Thread(target=collect_garbage, args=(ws, 1))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and ws.store.exists("curate", "o" * 24)
    worker.join(timeout=30)
    assert not worker.is_alive() and not ws.store.exists("curate", "o" * 24)


def test_gc_survives_a_lost_catalog_and_refuses_without_any_history(history, tmp_path):
    history.catalog_path.unlink()  # the run log keeps the history: gc rebuilds it and keeps what runs need
    report = collect_garbage(history, keep=1, dry_run=True)
    assert report.refused is None and {fp[0] for _, fp in report.kept} >= {"a", "z"}

    empty = Workspace.resolve(tmp_path / "empty")
    _publish(empty, "curate", "c" * 24, rows=1)
    report = collect_garbage(empty, keep=5)
    assert report.refused and "no run history" in report.refused and empty.store.exists("curate", "c" * 24)
    out = CliRunner().invoke(app, ["artifacts", "gc", "--keep", "5", "--min-age", "0", "-w", str(empty.root)])
    assert out.exit_code == 0 and "no run history" in out.output and empty.store.exists("curate", "c" * 24)


def test_gc_prunes_dead_checkpoints_and_unreferenced_cache_shards(history):
    import os

    from creditflow.storage.token_cache import TokenCache

    ws = history
    cache = TokenCache.for_workspace(ws)
    row = {"source": "contrastive", "n_tokens": 1, "token_ids": [1], "char_start": [0], "char_end": [1]}
    row.update(rewards=[0.1], ref_logps=[-1.0])
    used = cache.write_shard([{**row, "key": "used"}, {**row, "key": "also-orphaned-but-shares-a-shard"}])
    orphan = cache.write_shard([{**row, "key": "orphan"}])
    tokens = ws.store.writer("token_rewards", "t" * 24)
    tokens.write_table("token_rewards", pa.table({"key": ["used"]}))
    manifest = ws.store.publish(
        tokens, stage="token_rewards", fingerprint="t" * 24, inputs={}, config={}, code_version="v"
    )
    _record(ws, "p3", manifest)  # the newest run uses it
    dead = ws.root / "checkpoints" / "policy" / ("d" * 24)
    live = ws.root / "checkpoints" / "policy" / ("l" * 24)
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "state.pt").write_bytes(b"x" * 10)
    hour_ago = time.time() - 3600
    for path in (dead, used, orphan):
        os.utime(path, (hour_ago, hour_ago))

    report = collect_garbage(ws, keep=1, min_age=600)
    removed = {path for path, _ in report.removed_files}
    assert removed == {str(dead), str(orphan)}  # the live checkpoint is young; the used shard is referenced
    assert used.exists() and live.exists() and not orphan.exists() and not dead.exists()
    assert ws.store.exists("token_rewards", "t" * 24)


def test_a_running_stage_keeps_its_checkpoints_cache_shards_and_upstream_until_it_ends(history):
    """A running token-reward stage: no artifact references its checkpoint folder and first shards yet, and the
    curate artifact it reads belongs to no kept run. Its lease keeps all three, whatever their age (min_age 0)."""
    from creditflow.storage.leases import Lease, hold_lease
    from creditflow.storage.token_cache import TokenCache

    ws = history
    row = {"source": "contrastive", "n_tokens": 1, "token_ids": [1], "char_start": [0], "char_end": [1]}
    shard = TokenCache.for_workspace(ws).write_shard([{**row, "key": "new", "rewards": [0.1], "ref_logps": [-1.0]}])
    checkpoint = ws.root / "checkpoints" / "token_rewards" / ("r" * 24)
    (checkpoint / "shards").mkdir(parents=True)
    with hold_lease(ws.root, Lease("token_rewards", "r" * 24, (("curate", "o" * 24),))):
        report = collect_garbage(ws, keep=1, min_age=0)
        assert report.live == [("token_rewards", "r" * 24)]
        assert checkpoint.exists() and shard.exists() and "o" in _present(ws)
    collect_garbage(ws, keep=1, min_age=0)
    assert not checkpoint.exists() and not shard.exists() and "o" not in _present(ws)


def test_a_killed_stage_holds_no_lease(tmp_path):
    import signal
    import subprocess
    import sys

    from creditflow.storage.leases import live_leases

    holder = (
        "import sys, time; from creditflow.storage.leases import Lease, hold_lease\n"
        f"with hold_lease({str(tmp_path)!r}, Lease('policy', 'k' * 24, ())):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        assert [lease.stage for lease in live_leases(tmp_path)] == ["policy"]
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert live_leases(tmp_path) == []  # the kernel dropped the lock with the process; its files stay a minute
