"""Multi-process training under torchrun: the launch folder and spec, the launcher (one node or several),
the join for nodes > 0, and the worker's process-group set-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from creditflow.tasks.config_base import DistributedTrainingConfig
from creditflow.tasks.train.metrics import StepCallback

RDZV_ENV = "CREDITFLOW_RDZV_ENDPOINT"  # host:port of node 0's rendezvous, for runs over several nodes


WORKER_MODULE = "creditflow.tasks.train.torchrun_worker"


SPEC = "spec.json"


def torchrun_command(spec_path: Path, nproc: int, nnodes: int, node_rank: int, rdzv_id: str):
    """``python -m torch.distributed.run ...``: standalone on one node, a c10d rendezvous at $CREDITFLOW_RDZV_ENDPOINT
    over several."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        command.append("--standalone")
    else:
        endpoint = os.environ.get(RDZV_ENV)
        if not endpoint:
            raise ValueError(f"a run over {nnodes} nodes needs ${RDZV_ENV} (host:port of node 0, reachable from all)")
        command += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d"]
        command += [f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}"]
    return [*command, "-m", WORKER_MODULE, str(spec_path)]


def launch_folder(checkpoint_dir: str | Path) -> Path:
    """Where node 0 of a multi-node run leaves its launch spec for the others: beside the stage's checkpoint folder
    (which checkpoint saves replace wholesale), on the shared workspace."""
    return Path(checkpoint_dir).with_name(Path(checkpoint_dir).name + ".launch")


def launch_torchrun(
    trainer: str,
    config: DistributedTrainingConfig,
    paths: dict[str, str | Path | None],
    files: dict[str, Callable[[Path], None]] | None = None,
    on_step: StepCallback | None = None,
    launch_dir: Path | None = None,
    trust_remote_code: bool = False,
    poll_seconds: float = 0.5,
) -> list[dict[str, float]]:
    """Run ``python -m torch.distributed.run --nproc_per_node N -m creditflow.tasks.train.torchrun_worker SPEC.json``
    (node 0's share of ``config.nnodes``, ``config.num_processes`` per node) and wait.

    The spec names the ``trainer`` (the stage whose ``run_worker`` each process runs) and carries its ``config``,
    ``paths`` (model, checkpoint and output folders, as strings) and the pipeline's ``trust_remote_code``. Running
    in a subprocess frees every GPU byte when the stage ends. ``files`` writers put inputs beside the spec (their
    paths are added to it under the same names). The worker's rank 0 appends one JSON line of metrics per step to
    ``spec["metrics"]``, which this process tails and hands to ``on_step``, and writes the whole history to
    ``spec["history"]``, which is returned. With several nodes the spec goes to ``launch_dir``, a folder on the
    shared workspace where :func:`join_torchrun` on the other nodes finds it.
    """
    nproc, nnodes = config.num_processes, config.nnodes
    if nnodes > 1 and launch_dir is None:
        raise ValueError("a run over several nodes needs a launch folder on the shared workspace")
    work = Path(launch_dir) if nnodes > 1 else Path(tempfile.mkdtemp(prefix="creditflow-torchrun-"))
    process = None
    try:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        spec = {
            "trainer": trainer,
            "config": config.model_dump(),
            "trust_remote_code": trust_remote_code,
            **{key: None if path is None else str(path) for key, path in paths.items()},
            "metrics": str(work / "metrics.jsonl"),
            "history": str(work / "history.json"),
        }
        for name, write in (files or {}).items():
            write(work / name)
            spec[name] = str(work / name)
        launch = {"spec": spec, "nproc": nproc, "nnodes": nnodes, "rdzv_id": work.name}
        (work / f".{SPEC}.tmp").write_text(json.dumps(launch))
        os.rename(work / f".{SPEC}.tmp", work / SPEC)  # complete when visible: other nodes start from it
        (work / "worker-spec.json").write_text(json.dumps(spec))
        command = torchrun_command(work / "worker-spec.json", nproc, nnodes, 0, work.name)
        with open(work / "output.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            offset = 0
            while True:
                done = process.poll() is not None
                offset = _forward_metrics(work / "metrics.jsonl", offset, on_step)
                if done:
                    break
                time.sleep(poll_seconds)
        if process.returncode != 0:
            tail = (work / "output.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"torchrun exited with status {process.returncode}; its output ends with:\n{tail}")
        return json.loads((work / "history.json").read_text())
    finally:
        if process is not None and process.poll() is None:  # interrupted while waiting: stop our torchrun
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


def join_torchrun(launch_dir: str | Path, node_rank: int, timeout: float = 3600.0, poll_seconds: float = 1.0) -> int:
    """On node ``node_rank`` > 0: wait for node 0's launch spec in ``launch_dir``, run this node's torchrun share with
    it, and return torchrun's exit status (rank 0, and so every output, lives on node 0)."""
    spec_path, deadline = Path(launch_dir) / SPEC, time.monotonic() + timeout
    while not spec_path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no launch spec appeared in {launch_dir} within {timeout:.0f} s (is node 0 running?)")
        time.sleep(poll_seconds)
    launch = json.loads(spec_path.read_text())
    if not 0 < node_rank < launch["nnodes"]:
        raise ValueError(f"node_rank {node_rank}: this run has nodes 0..{launch['nnodes'] - 1} and 0 is the launcher")
    spec_copy = Path(tempfile.mkdtemp(prefix="creditflow-join-")) / "worker-spec.json"
    spec_copy.write_text(json.dumps(launch["spec"]))  # node 0 removes its launch folder when the run ends
    command = torchrun_command(spec_copy, launch["nproc"], launch["nnodes"], node_rank, launch["rdzv_id"])
    return subprocess.run(command).returncode


def _forward_metrics(path: Path, offset: int, on_step: StepCallback | None) -> int:
    """Hand every complete new line of the metrics file to ``on_step``; returns the new read offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        entry = json.loads(line)
        if on_step is not None:
            on_step(entry.pop("step"), entry)
    return offset + len(complete)


def init_worker_process_group() -> None:
    """Inside a torchrun worker: bind this process's GPU (if any) and join the group (nccl on CUDA, else gloo)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
