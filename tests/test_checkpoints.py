"""Checkpoints in the workspace: read without running code from them."""

import os
import pickle

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from creditflow.tasks import fsdp


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
