"""Padding-free batches: sequences laid end to end in a few rows, position ids restarting at 0 for each.

transformers reads the restarts (``attention_mask=None`` plus ``position_ids``, no cache) as sequence boundaries and
keeps attention inside each sequence: flex_attention gets a block mask, flash-attn its varlen kernel, SDPA and eager
a dense block-diagonal mask. Only the first two skip the masked-out work, so packing pays on GPUs with one of them
(docs/gpu_notes.md: flex 75k tok/s against 68k padded; packing through SDPA drops to 42k). On CPU it is exact but no
faster.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch


@dataclass
class PackedLayout:
    rows: list[int]  # packed row of each sequence
    starts: list[int]  # its first column in that row
    width: int  # columns of every packed row (the longest row, rounded up)

    @property
    def n_rows(self) -> int:
        return max(self.rows) + 1


def pack_layout(lengths: list[int], budget: int | None = None, multiple: int = 1) -> PackedLayout:
    """First-fit decreasing: the longest sequence first, each into the first row with room for it. ``budget``:
    tokens per row (None: every sequence in one row); a sequence longer than the budget gets a row of its own."""
    capacity = budget or sum(lengths)
    rows, starts, filled = [0] * len(lengths), [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(filled) if used + lengths[i] <= capacity), len(filled))
        if row == len(filled):
            filled.append(0)
        rows[i], starts[i] = row, filled[row]
        filled[row] += lengths[i]
    return PackedLayout(rows, starts, -(-max(filled) // multiple) * multiple)


def packed_tensors(sequences: list[list[int]], layout: PackedLayout, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids), each [rows, width]. A row's unused tail is pad tokens counted as a sequence of its
    own (positions from 0), so no real token attends to it."""
    input_ids = torch.full((layout.n_rows, layout.width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((layout.n_rows, layout.width), dtype=torch.long)
    ends = [0] * layout.n_rows
    for ids, row, start in zip(sequences, layout.rows, layout.starts):
        input_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[row, start : start + len(ids)] = torch.arange(len(ids))
        ends[row] = max(ends[row], start + len(ids))
    for row, end in enumerate(ends):
        position_ids[row, end:] = torch.arange(layout.width - end)
    return input_ids, position_ids


def packed_attention(device: torch.device) -> str:
    """The attention kernel for packed rows: flash-attn's varlen kernel when installed, else flex_attention on
    CUDA; SDPA with the dense block mask on CPU (flex_attention has no CPU backward)."""
    if device.type != "cuda":
        return "sdpa"
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex_attention"
