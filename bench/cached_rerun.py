"""Wall time of a fully cached pipeline rerun: the light record vs the Prefect path, embedded and with servers.

    .venv/bin/python bench/cached_rerun.py [--config configs/demo_tiny.yaml] [--repeats 3]

Runs the pipeline once in a fresh workspace (to fill the cache), then, each in a fresh process:
- ``creditflow run`` with the embedded defaults (a fully cached run is one light MLflow record: no Prefect);
- the baseline: the same rerun through ``pipeline_flow``, the Prefect path every rerun took before (a temporary
  Prefect server, a subflow, task and MLflow child run per stage);
- ``creditflow run`` again with ``creditflow up`` servers running (MLflow over HTTP);
- ``creditflow stage policy`` on its cached artifact (one MLflow run, no Prefect) against its baseline, the stage's
  Prefect flow (``policy_flow``), which every ``creditflow stage`` took before.
Prints the median of ``--repeats`` and the ratio to the baseline. Absolute times mean something only on an idle
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "creditflow.flows.cli"]


def timed(command: list[str], env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        if "computed" in out.stdout:
            raise SystemExit(f"{' '.join(command)} recomputed a stage: the cache was not full")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_tiny.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="bench-cached-")) / "ws"
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(COLUMNS="200", PREFECT_HOME=str(workspace.parent / "prefect-home"))
    run = [*CLI, "run", "-c", args.config, "-w", str(workspace), "--quiet"]
    print(f"filling the cache in {workspace} ...", flush=True)
    subprocess.run(run, env=env, check=True, capture_output=True)

    from creditflow.flows.config import load_config

    config = json.dumps(load_config(args.config).model_dump(mode="json"))
    baseline_probe = (
        "import json; from creditflow.flows.pipeline import pipeline_flow; "
        f"pipeline_flow(config=json.loads({config!r}), workspace={str(workspace)!r}, progress=False)"
    )
    baseline = timed([sys.executable, "-c", baseline_probe], env, args.repeats)
    light = timed(run, env, args.repeats)
    stage_probe = (
        "import json; from creditflow.flows.pipeline import policy_flow; "
        f"policy_flow(config=json.loads({config!r}), workspace={str(workspace)!r}, progress=False)"
    )
    stage_baseline = timed([sys.executable, "-c", stage_probe], env, args.repeats)
    stage = timed([*CLI, "stage", "policy", "-c", args.config, "-w", str(workspace), "--quiet"], env, args.repeats)
    subprocess.run([*CLI, "up", "-w", str(workspace)], env=env, check=True, capture_output=True)
    try:
        with_servers = timed(run, env, args.repeats)
    finally:
        subprocess.run([*CLI, "down", "-w", str(workspace)], env=env, capture_output=True)
    print(f"{'baseline: pipeline_flow (Prefect path), embedded':<50} {baseline:6.1f} s")
    print(f"{'creditflow run, embedded defaults':<50} {light:6.1f} s   {light / baseline:5.2f}x baseline")
    ratio = with_servers / baseline
    print(f"{'creditflow run, with creditflow up':<50} {with_servers:6.1f} s   {ratio:5.2f}x baseline")
    print(f"{'baseline: policy_flow (Prefect path), embedded':<50} {stage_baseline:6.1f} s")
    ratio = stage / stage_baseline
    print(f"{'creditflow stage policy (cached), embedded':<50} {stage:6.1f} s   {ratio:5.2f}x baseline")


if __name__ == "__main__":
    main()
