"""Device and precision: which device a run uses, the dtype its weights load in, bf16 autocast."""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Precision:
    """How a model computes: the dtype its weights hold, and whether bf16 autocast wraps its forward."""

    weights: torch.dtype
    bf16_autocast: bool = False

    @property
    def label(self) -> str:
        """The spelling token-reward cache keys use (``torch.float32+autocast-bf16``)."""
        return f"{self.weights}{'+autocast-bf16' if self.bf16_autocast else ''}"

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast)


def compute_precision(mode: str, device: torch.device) -> Precision:
    """The :class:`Precision` of ``mode`` (``config_base.precision_mode``: float32, bf16-autocast, bf16-params) on
    ``device``. CPUs compute in fp32 whatever the mode (bf16 matmuls there are slow or emulated)."""
    if mode == "float32" or device.type != "cuda":
        return Precision(torch.float32)
    return Precision(torch.bfloat16 if mode == "bf16-params" else torch.float32, bf16_autocast=True)


def reference_precision(spec: str, device: torch.device, policy_mode: str = "bf16-autocast") -> Precision:
    """The precision the reference log-probs DPO compares against are scored at. ``auto`` is the policy stage's
    own (``policy_mode`` on ``device``): log π(y) at step 0 then equals the stored log π_ref(y), so the DPO margin
    starts at 0. ``float32`` / ``bfloat16`` are plain weights of that dtype, without autocast."""
    if spec == "auto":
        return compute_precision(policy_mode, device)
    return Precision(getattr(torch, spec))


# The token-reward artifact's record of the precision its reference log-probs were scored at (Precision.label).
REFERENCE_PRECISION_FILE = "reference_precision.json"


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast over fp32 master weights on CUDA; a no-op elsewhere (CPU trains in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
