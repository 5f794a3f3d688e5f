"""Device and precision: which device a run uses, the dtype its weights load in, bf16 autocast."""

from __future__ import annotations

import os

import torch


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
