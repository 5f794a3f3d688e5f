"""One process of a multi-process policy run, started by ``policy.launch_distributed`` as

    python -m torch.distributed.run --standalone --nproc_per_node N -m creditflow.tasks.policy_worker SPEC.json

SPEC names the model, the config, the examples file, the checkpoint and output folders, and where rank 0 appends
one JSON line of metrics per step (the parent tails it) and writes the full history at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from creditflow.tasks.policy import PolicyConfig, PolicyExample, PolicyTrainer


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        config = PolicyConfig.from_dict(spec["config"])
        examples = [PolicyExample.from_dict(e) for e in torch.load(spec["examples"], weights_only=True)]
        metrics_file = open(spec["metrics"], "a") if dist.get_rank() == 0 else None

        def append(step: int, metrics: dict[str, float]) -> None:
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()

        trainer = PolicyTrainer(
            spec["model_dir"],
            examples,
            config,
            checkpoint_dir=spec["checkpoint_dir"],
            on_step=append,
            progress=False,
        )
        history = trainer.train()
        trainer.save_pretrained(spec["output_dir"])
        if metrics_file is not None:
            metrics_file.close()
            Path(spec["history"]).write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
