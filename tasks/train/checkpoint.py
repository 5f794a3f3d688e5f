"""Atomic, resumable checkpoints.

Checkpoints hold the trainable weights as safetensors and everything else (optimizer, scheduler, step, data
position, metric history, config, RNG state per process) as tensors and plain containers, read back with
``torch.load(weights_only=True)``: a file planted in the workspace cannot run code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from creditflow.tasks.train import fsdp


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


def save_training_state(
    checkpoint: Checkpoint, trainable, optimizer, scheduler, identity: dict, *, sharded_model=None, **progress
) -> None:
    """Checkpoint the trainable weights, optimizer and scheduler, with ``identity`` (what makes this run this run:
    config, process count) and ``progress`` (step, data position, history). With ``sharded_model`` (FSDP2) every
    process writes its shards of weights and optimizer state instead (DCP); rank 0 the rest. Every trainer saves
    through here."""
    state = {"scheduler": scheduler.state_dict(), **identity, **progress}
    if sharded_model is not None:
        checkpoint.save({}, state, write_shards=lambda folder: fsdp.save_sharded(folder, sharded_model, optimizer))
    else:
        checkpoint.save(trainable, {"optimizer": optimizer.state_dict(), **state})


def resume_training_state(
    checkpoint: Checkpoint, trainable, optimizer, scheduler, identity: dict, *, sharded_model=None
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote (and this process's RNG); returns the stored state."""
    if sharded_model is not None:
        folder = checkpoint.latest()
        _, state = checkpoint.load(identity)
        fsdp.load_sharded(folder, sharded_model, optimizer)
    else:
        weights, state = checkpoint.load(identity)
        if set(weights) != set(trainable):
            raise ValueError(
                f"{checkpoint.folder}: checkpoint parameters do not match the model's trainable parameters"
            )
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(weights[name])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state
