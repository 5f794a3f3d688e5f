"""One process of a trainer launched by ``launch.launch_torchrun``:

    python -m torch.distributed.run --nproc_per_node N -m creditflow.tasks.train.torchrun_worker SPEC.json

SPEC names the trainer (``policy`` or ``reward_model``, a key of ``TRAINERS``) and everything it reads and writes;
that recipe's ``run_worker(spec, on_step)`` trains and saves. This module is plumbing around it: the stage's code
digest covers the recipe's module and all it imports, not this launcher (like Prefect, it computes no row).
Rank 0 appends one JSON line of metrics per step to
``spec["metrics"]`` (the launching process tails it) and writes the full history to ``spec["history"]``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from creditflow.tasks.recipes import policy, reward_model
from creditflow.tasks.train.launch import init_worker_process_group
from creditflow.tasks.train.metrics import MetricsAppender

# A fixed table: the spec names a trainer, never code to import.
TRAINERS = {"policy": policy.run_worker, "reward_model": reward_model.run_worker}


def main(spec_path: str) -> None:
    faulthandler.enable()  # a worker killed by a signal (a C++ abort in a collective) prints where it was
    spec = json.loads(Path(spec_path).read_text())
    run_worker = TRAINERS[spec["trainer"]]
    init_worker_process_group()
    append = MetricsAppender(spec["metrics"], dist.get_rank())
    history = run_worker(spec, append)
    append.close()
    if dist.get_rank() == 0:
        Path(spec["history"]).write_text(json.dumps(history))
    # Only after success, and together: a rank that tears its group down while another is still in a collective
    # (or after an error, while the others wait in one) can abort or hang; on an error torchrun stops the rest.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written and the group is torn down; skip interpreter finalization, where a leftover gloo thread
    # is sometimes destroyed while joinable ("terminate called without an active exception", then SIGABRT/SIGBUS
    # after the last step: about 1 run in 12 of the 40-step FSDP test). Errors above still exit non-zero.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
