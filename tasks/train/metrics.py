"""Training metrics: the per-step history as a table, timings kept apart from results, peak memory,
and the JSON-lines file torchrun workers append their metrics to.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Callable

import pyarrow as pa
import torch

StepCallback = Callable[[int, dict[str, float]], None]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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
