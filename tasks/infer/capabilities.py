"""Capability regression (the alignment tax): lm-evaluation-harness tasks on the reference and on each policy.

``evaluate.lm_eval_tasks`` names harness tasks (its built-ins, which read their data from the hub, or tasks of
``evaluate.lm_eval_include_path``, a folder of task YAMLs that may read local files, as the tests do offline). Each
system is scored with the harness's own ``hf`` model on the evaluation device; a task's headline is its first
metric (``acc``, ``exact_match``, ...), reported per system and as the policy's change from the reference.

The harness is an optional extra (``pip install 'creditflow[eval]'``): it is imported only when tasks are asked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXTRA = "pip install 'creditflow[eval]'"


def check_installed() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"evaluate.lm_eval_tasks needs lm-evaluation-harness: {EXTRA}")


def run_lm_eval(
    folder: str | Path,
    tasks: list[str],
    include_path: str | None,
    device: torch.device,
    batch_size: int,
    limit: int | None,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the model in ``folder`` (stderr entries left out)."""
    check_installed()
    import lm_eval  # the optional extra
    from lm_eval.tasks import TaskManager

    dtype = "bfloat16" if device.type == "cuda" else "float32"
    args = f"pretrained={folder},dtype={dtype},trust_remote_code={trust_remote_code}"
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" nor in {include_path}" if include_path else " (lm_eval_include_path adds your own)"
        raise ValueError(f"evaluate.lm_eval_tasks: {unknown[0]!r} is not a harness task{where}")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=list(tasks),
        task_manager=manager,
        device=str(device),
        batch_size=batch_size,
        limit=limit,
        log_samples=False,
    )
    if out is None:  # the harness returns None on non-zero ranks only
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    results = {}
    for task in tasks:
        metrics = out["results"].get(task)
        if metrics is None:
            raise ValueError(f"evaluate.lm_eval_tasks: the harness reported no results for task {task!r}")
        results[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "stderr" not in key and isinstance(value, (int, float))
        }
    return results
