"""What every trainer shares: device and dtype choice, AdamW parameter groups, the warmup + cosine schedule,
atomic resumable checkpoints, peak-memory readings, and the torchrun launcher for multi-process runs.

Checkpoints hold the trainable weights as safetensors and everything else (optimizer, scheduler, step, data
position, metric history, config, RNG state per process) as tensors and plain containers, read back with
``torch.load(weights_only=True)``: a file planted in the workspace cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from creditflow.tasks.config_base import DistributedTrainingConfig

StepCallback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun) when there is one, else the CPU."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def inference_dtype(spec: str, device: torch.device) -> torch.dtype:
    """bf16 halves memory and doubles throughput on GPUs; CPUs get fp32 (bf16 matmuls there are slow or emulated)."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def reference_precision(spec: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """(weight dtype, bf16 autocast) for the reference log-probs DPO compares against. ``auto`` is the policy's own
    precision (fp32 weights under bf16 autocast on CUDA, fp32 on CPU): log π(y) at step 0 then equals the stored
    log π_ref(y), so the DPO margin starts at 0. ``bfloat16`` (pure bf16 weights) is faster but approximate."""
    if spec == "auto":
        return torch.float32, device.type == "cuda"
    return getattr(torch, spec), False


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast over fp32 master weights on CUDA; a no-op elsewhere (CPU trains in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def adamw(named_parameters: dict[str, torch.nn.Parameter], learning_rate: float, weight_decay: float, device):
    """AdamW with no decay on norms and biases (parameters with fewer than 2 dims), as the HF Trainer does."""
    decay = [p for p in named_parameters.values() if p.ndim >= 2]
    rest = [p for p in named_parameters.values() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=learning_rate,
        fused=device.type == "cuda",
    )


def warmup_steps(warmup_ratio: float, total_steps: int) -> int:
    """Warmup length, rounded down: ``int(ratio * total)``."""
    return int(warmup_ratio * total_steps)


def cosine_schedule(optimizer, warmup: int, total_steps: int) -> LambdaLR:
    """Linear warmup to the peak learning rate, then cosine decay to 0. Unlike transformers'
    ``get_cosine_schedule_with_warmup`` the warmup starts at peak/(warmup + 1), not 0, so the first optimizer step
    updates the weights (written out, too, because importing that module imports peft: seconds per torchrun worker).
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)


def total_steps(micro_batches_per_epoch: int, micro_per_step: int, epochs: int, max_steps: int | None) -> int:
    total = math.ceil(micro_batches_per_epoch / micro_per_step) * epochs
    return min(total, max_steps) if max_steps is not None else total


# ---------------------------------------------------------------------------------------------------------
# Training logs

TIMING_METRICS = ("tokens_per_s", "peak_memory_gb", "seconds")  # how the run went, not what it computed


def split_timings(history: list[dict[str, float]]) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """(the deterministic per-step metrics, the per-step timings), both keyed by step."""
    content = [{k: v for k, v in h.items() if k not in TIMING_METRICS} for h in history]
    timings = [{"step": h["step"], **{k: h[k] for k in TIMING_METRICS if k in h}} for h in history]
    return content, timings


def history_table(history: list[dict[str, float]]) -> pa.Table:
    names = list(dict.fromkeys(k for entry in history for k in entry if k != "step"))
    columns = {"step": pa.array([h["step"] for h in history], pa.int32())}
    columns.update({k: pa.array([h.get(k) for h in history], pa.float64()) for k in names})
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Checkpoint:
    """One resumable checkpoint folder, replaced atomically.

    A save writes ``<folder>.tmp-<step>``, moves the current folder to ``.old`` and renames the new one into place,
    so at every instant the folder or ``.old`` holds a complete checkpoint; ``state.pt`` is written last and marks
    one as complete. Rank 0 writes weights and state, every rank its own RNG state.
    """

    STATE = "state.pt"
    WEIGHTS = "trainable.safetensors"

    def __init__(self, folder: str | Path, rank: int = 0):
        self.folder = Path(folder)
        self.rank = rank

    @property
    def _old(self) -> Path:
        return self.folder.with_name(self.folder.name + ".old")

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the folder, or ``.old`` if a swap was interrupted."""
        for folder in (self.folder, self._old):
            if (folder / self.STATE).is_file():
                return folder
        return None

    def save(
        self,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        write_shards: Callable[[Path], None] | None = None,
    ) -> None:
        """Rank 0 writes ``weights`` (may be empty) and ``state``; with ``write_shards`` every rank also writes its
        shards into the new folder (FSDP) before it is renamed into place."""
        tmp = self.folder.with_name(f"{self.folder.name}.tmp-{state['step']}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(_rng_state(), tmp / f"rng-{self.rank}.pt")
        if write_shards is not None:
            write_shards(tmp)
        _barrier()
        if self.rank == 0:
            save_file({n: t.detach().contiguous().cpu() for n, t in weights.items()}, tmp / self.WEIGHTS)
            torch.save(state, tmp / self.STATE)  # last: its presence marks a complete checkpoint
            if self.folder.exists():
                shutil.rmtree(self._old, ignore_errors=True)
                os.rename(self.folder, self._old)
            os.rename(tmp, self.folder)
            shutil.rmtree(self._old, ignore_errors=True)
        _barrier()

    def load(self, expected: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(weights, state) of :meth:`latest`, with this process's RNG restored. ``expected`` keys (config,
        process count) must match the stored state: a checkpoint of another run is refused."""
        folder = self.latest()
        state = torch.load(folder / self.STATE, map_location="cpu", weights_only=True)
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"{folder}: checkpoint of another run ({key} differs); delete the folder to start over"
                )
        weights = load_file(folder / self.WEIGHTS)
        _set_rng_state(torch.load(folder / f"rng-{self.rank}.pt", weights_only=True))
        return weights, state

    def remove(self) -> None:
        for folder in (self.folder, self._old):
            shutil.rmtree(folder, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict[str, torch.Tensor | None]) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def save_training_state(checkpoint: Checkpoint, trainable, optimizer, scheduler, identity: dict, **progress) -> None:
    """Checkpoint the trainable weights, optimizer and scheduler, with ``identity`` (what makes this run this run:
    config, process count) and ``progress`` (step, data position, history)."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **identity, **progress}
    checkpoint.save(trainable, state)


def resume_training_state(checkpoint: Checkpoint, trainable, optimizer, scheduler, identity: dict) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote (and this process's RNG); returns the stored state."""
    weights, state = checkpoint.load(identity)
    if set(weights) != set(trainable):
        raise ValueError(f"{checkpoint.folder}: checkpoint parameters do not match the model's trainable parameters")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


# ---------------------------------------------------------------------------------------------------------
# Several processes: torchrun in a subprocess, metrics streamed back


RDZV_ENV = "CREDITFLOW_RDZV_ENDPOINT"  # host:port of node 0's rendezvous, for runs over several nodes
WORKER_MODULE = "creditflow.tasks.torchrun_worker"
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
    """Run ``python -m torch.distributed.run --nproc_per_node N -m creditflow.tasks.torchrun_worker SPEC.json`` (node
    0's share of ``config.nnodes``, ``config.num_processes`` per node) and wait.

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


class MetricsAppender:
    """Rank 0's side of :func:`launch_torchrun`: one JSON line per step, flushed as it is written."""

    def __init__(self, path: str | Path, rank: int):
        self.handle = open(path, "a") if rank == 0 else None

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps({"step": step, **metrics}) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
