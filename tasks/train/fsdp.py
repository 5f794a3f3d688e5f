"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainers that run under torchrun (policy, reward model).

Each transformer block (decoder layer) is its own FSDP unit (all-gathered just before it runs, freed after), then
the root module takes what is left (embeddings, final norm, LM or reward head). Every process holds 1/world of the
fp32 weights, gradients and AdamW state: an 8B model's ~144 GB of training state becomes ~18 GB per GPU on 8 GPUs.
On CUDA the units compute in bf16 and reduce gradients in fp32 (``MixedPrecisionPolicy``); on CPU (gloo, the tests)
everything stays fp32.

Checkpoints are sharded with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the model
and optimizer state into the checkpoint folder, which ``checkpoint.Checkpoint`` then renames into place atomically,
so a SIGKILL leaves the previous complete checkpoint. The final model is gathered once into a full state dict on
rank 0 and saved as a normal Hugging Face folder.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

SHARDED = "sharded"  # the DCP folder inside a checkpoint


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: its longest ModuleList of same-class modules (``model.layers``
    of Llama, Qwen or Mistral, ``encoder.layer`` of BERT-style encoders)."""
    stacks = [
        m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1
    ]
    if not stacks:
        raise NotImplementedError(f"{type(model).__name__}: no repeated blocks to shard; use strategy: ddp")
    return list(max(stacks, key=len))


def shard(root: torch.nn.Module, model, device: torch.device, bf16: bool, cpu_offload: bool) -> None:
    """``fully_shard`` every block of ``model``, then ``root`` (the module whose forward the trainer calls)."""
    mixed = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 and device.type == "cuda" else None, reduce_dtype=torch.float32
    )
    # pinned host memory (the fast copy to a GPU) needs an accelerator: on CPU it raises
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    options = {"mp_policy": mixed, **({"offload_policy": offload} if cpu_offload else {})}
    for layer in transformer_blocks(model):
        fully_shard(layer, **options)
    fully_shard(root, **options)


def save_sharded(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state under ``folder``."""
    state = {"model": get_model_state_dict(root), "optimizer": get_optimizer_state_dict(root, optimizer)}
    dcp.save(state, checkpoint_id=str(folder / SHARDED))


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; in a workspace it is untrusted, so only the classes DCP itself writes there
    (its metadata dataclasses, tensor sizes, dtypes, layouts, paths) may be built from it."""

    def find_class(self, module: str, name: str):
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size")}
            or (module, name) in {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"sharded checkpoint metadata names {module}.{name}, which DCP never writes")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    """torch's reader with ``pickle.load`` of the metadata replaced by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor state (the optimizer's param_groups) is read with ``weights_only=True``, where torch's planner
    uses a full unpickle; the checked value is handed on re-serialized, so the planner's own bookkeeping stays."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        checked = io.BytesIO()
        torch.save(torch.load(value, weights_only=True), checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)


def load_sharded(folder: Path, root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote into this rank's shards (the world size must be the same); nothing in
    the checkpoint can run code (see :class:`_SafeReader`, :class:`_SafePlanner`)."""
    state = {"model": get_model_state_dict(root), "optimizer": get_optimizer_state_dict(root, optimizer)}
    dcp.load(state, storage_reader=_SafeReader(folder / SHARDED), planner=_SafePlanner())
    set_model_state_dict(root, state["model"])
    set_optimizer_state_dict(root, optimizer, state["optimizer"])


def full_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU (empty on the other ranks); every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(root, options=options)
    return state if dist.get_rank() == 0 else {}


def total_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float: over DTensor gradients it is a DTensor of the global norm."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
