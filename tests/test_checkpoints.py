"""Checkpoints in the workspace: read without running code from them."""

import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from creditflow.tasks.train import fsdp


def _trained_linear(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_round_trips_and_a_planted_pickle_runs_nothing(tmp_path):
    model, optimizer = _trained_linear(0)
    fsdp.save_sharded(tmp_path, model, optimizer)
    fresh, fresh_optimizer = _trained_linear(1)
    fsdp.load_sharded(tmp_path, fresh, fresh_optimizer)  # the optimizer's param_groups go through _SafePlanner
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(
        fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / fsdp.SHARDED / ".metadata").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(CheckpointException, match="posix.system, which DCP never writes"):
        fsdp.load_sharded(tmp_path, fresh, fresh_optimizer)
    assert not marker.exists()


def test_a_swap_killed_between_its_renames_resumes_from_the_old_folder(tmp_path):
    """Checkpoint.save moves the current folder to ``.old`` and then renames the new one in: a kill between the two
    leaves only ``.old`` (and the half-made ``.tmp-*``), which both trainers (policy, reward model) resume from."""
    from creditflow.tasks.train.checkpoint import Checkpoint, resume_training_state, save_training_state

    model, optimizer = _trained_linear(0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainable = dict(model.named_parameters())
    checkpoint = Checkpoint(tmp_path / "ckpt")
    save_training_state(checkpoint, trainable, optimizer, scheduler, {"config": "c"}, step=1)
    saved = {name: tensor.clone() for name, tensor in trainable.items()}
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # the kill: moved aside, the new one not renamed in yet
    (tmp_path / "ckpt.tmp-2").mkdir()
    assert checkpoint.latest() == tmp_path / "ckpt.old"

    fresh, fresh_optimizer = _trained_linear(1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0)
    fresh_trainable = dict(fresh.named_parameters())
    state = resume_training_state(checkpoint, fresh_trainable, fresh_optimizer, fresh_scheduler, {"config": "c"})
    assert state["step"] == 1 and all(torch.equal(fresh_trainable[n], saved[n]) for n in saved)
    with pytest.raises(ValueError, match="checkpoint of another run"):
        resume_training_state(checkpoint, fresh_trainable, fresh_optimizer, fresh_scheduler, {"config": "other"})

    save_training_state(checkpoint, fresh_trainable, fresh_optimizer, fresh_scheduler, {"config": "c"}, step=2)
    assert checkpoint.latest() == tmp_path / "ckpt" and not (tmp_path / "ckpt.old").exists()
    assert not (tmp_path / "ckpt.tmp-2").exists()
