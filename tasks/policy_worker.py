"""One process of a multi-process policy run, started by ``policy.launch_distributed`` as

    python -m torch.distributed.run --standalone --nproc_per_node N -m creditflow.tasks.policy_worker SPEC.json

SPEC names the model, the config, the examples file, the checkpoint and output folders, and where rank 0 appends
one JSON line of metrics per step (the parent tails it) and writes the full history at the end.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from creditflow.tasks.configs import PolicyConfig
from creditflow.tasks.policy import PolicyTrainer
from creditflow.tasks.preference_batches import PolicyExample
from creditflow.tasks.training import MetricsAppender, init_worker_process_group


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    init_worker_process_group()
    try:
        config = PolicyConfig.model_validate(spec["config"])
        examples = [PolicyExample.from_dict(e) for e in torch.load(spec["examples"], weights_only=True)]
        append = MetricsAppender(spec["metrics"], dist.get_rank())
        trainer = PolicyTrainer(
            spec["model_dir"], examples, config, checkpoint_dir=spec["checkpoint_dir"], on_step=append, progress=False
        )
        history = trainer.train()
        trainer.save_pretrained(spec["output_dir"], spec["adapter_dir"])
        append.close()
        if dist.get_rank() == 0:
            Path(spec["history"]).write_text(json.dumps(history))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
