"""Preference pairs as the policy trainer consumes them: per-side token ids with the cached reference log-probs
and token rewards (checked token by token against the ids the trainer derives), right-padded or packed batches, and the
seeded, length-grouped micro-batch order of each epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from creditflow.tasks.credit.attention_credit import regularizer_rewards
from creditflow.tasks.data.schema import SIDES, Messages
from creditflow.tasks.models.packing import pack_layout, packed_tensors
from creditflow.tasks.models.tokenization import encode_pair, padded_batch

# cuDNN's SDPA pays 0.1-2 s per new padded shape and torch.compile a recompile; rounding widths to 64 keeps the shape
# count small (docs/gpu_notes.md: TRL 33k -> 56k tok/s). Eager CPU kernels have no per-shape cost.
SHAPE_BUCKET = 64
MEGABATCH = 50  # micro-batches sorted by length together (as transformers' LengthGroupedSampler)


@dataclass
class SideTokens:
    prompt_ids: list[int]
    completion_ids: list[int]
    ref_logps: list[float]  # log pi_ref of each completion token under the plain prompt
    rewards: list[float] | None  # r_hat per completion token; None when token_reward_source is none


@dataclass
class PolicyExample:
    pair_id: str
    chosen: SideTokens
    rejected: SideTokens

    @property
    def length(self) -> int:
        """Width this pair needs in a padded batch (both rows share it)."""
        return max(len(s.prompt_ids) + len(s.completion_ids) for s in (self.chosen, self.rejected))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyExample":
        return cls(data["pair_id"], SideTokens(**data["chosen"]), SideTokens(**data["rejected"]))


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def build_examples(
    tokenizer,
    pairs: pa.Table,
    token_rewards: pa.Table,
    source: str,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation: str,
    abc_beta: float = 0.8,
) -> list[PolicyExample]:
    """Training examples for ``pairs`` from the token-reward table, checked token by token.

    Ids are re-derived with :func:`encode_pair` under the token-reward stage's tokenization knobs and must equal the
    ``contrastive`` rows' ``token_ids``: those rows carry the reference log-probs, and their r_hat is aligned to
    exactly these tokens. ``abc`` rows live on the reward model's tokens: they become centered, bounded r̂ on the
    policy's tokens (``abc.regularizer_rewards``, with ``abc_beta`` the token-reward stage's β and the reward
    standardized over these pairs' rows).
    """
    wanted = set(pairs.column("pair_id").to_pylist())
    columns = ["pair_id", "side", "source", "token_ids", "rewards", "ref_logps"]
    if source == "abc":
        columns += ["char_start", "char_end"]
    rows = {
        (r["pair_id"], r["side"], r["source"]): r
        for r in token_rewards.select(columns).to_pylist()
        if r["pair_id"] in wanted and r["source"] in ("contrastive", source)
    }
    abc_rewards = [sum(r["rewards"]) for key, r in rows.items() if key[2] == "abc"]
    abc = (abc_beta, float(np.mean(abc_rewards)), float(np.std(abc_rewards))) if abc_rewards else None
    examples = []
    for pair in pairs.select(["pair_id", "prompt", *SIDES]).to_pylist():
        sides = {}
        for side in SIDES:
            prompt_ids, completion_ids = encode_pair(
                tokenizer, pair["prompt"], pair[side], max_length, max_prompt_length, truncation
            )
            sides[side] = _side_tokens(
                rows, pair["pair_id"], side, pair[side], prompt_ids, completion_ids, source, tokenizer, abc
            )
        examples.append(PolicyExample(pair["pair_id"], sides["chosen"], sides["rejected"]))
    return examples


def _side_tokens(
    rows: dict, pair_id: str, side: str, completion: Messages, prompt_ids, completion_ids, source, tokenizer, abc
) -> SideTokens:
    where = f"policy: pair {pair_id} ({side})"
    row = rows.get((pair_id, side, "contrastive"))
    if row is None:
        raise ValueError(
            f"{where}: the token_rewards artifact has no contrastive row for it. Contrastive rows carry the policy's "
            "token ids and reference log-probs: token_rewards.sources must include 'contrastive', and the stage must "
            "have scored these pairs"
        )
    stored = row["token_ids"]
    position = _first_difference(stored, completion_ids)
    if position is not None:

        def at(ids: list[int]) -> str:
            return str(ids[position]) if position < len(ids) else "end of sequence"

        raise ValueError(
            f"{where}: stored token ids differ from encode_pair's at completion position {position} "
            f"(stored {at(stored)}, encode_pair {at(completion_ids)}; {len(stored)} vs {len(completion_ids)} tokens). "
            "The token_rewards artifact was made with another tokenizer, chat template or truncation: recompute it"
        )
    if row["ref_logps"] is None or len(row["ref_logps"]) != len(stored):
        raise ValueError(f"{where}: the contrastive row has no reference log-probs for every token")
    if source == "none":
        rewards = None
    elif source == "contrastive":
        rewards = row["rewards"]
    else:
        abc_row = rows.get((pair_id, side, "abc"))
        if abc_row is None:
            raise ValueError(f"{where}: token_reward_source is 'abc' but the token_rewards artifact has no abc row")
        rewards = regularizer_rewards(abc_row, tokenizer, completion, len(completion_ids), *abc).tolist()
    if rewards is not None and len(rewards) != len(stored):
        raise ValueError(f"{where}: {len(rewards)} token rewards for {len(stored)} tokens")
    return SideTokens(prompt_ids, completion_ids, row["ref_logps"], rewards)


# ---------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """The B chosen sides, then the B rejected ones: right-padded rows ``[prompt | completion | pad]``, or packed
    rows (``position_ids`` restarting per sequence, no attention mask; tasks/models/packing.py)."""

    input_ids: torch.Tensor  # [2B, S] padded, [R, S] packed
    attention_mask: torch.Tensor | None  # [2B, S]; None when packed
    position_ids: torch.Tensor | None  # [R, S] when packed
    rows: torch.Tensor  # [N] input row of every completion token
    cols: torch.Tensor  # [N] its column (predicted from column - 1)
    sides: torch.Tensor  # [N] its side (row of mask / ref_logps / rewards)
    index: torch.Tensor  # [N] its position inside the completion
    mask: torch.Tensor  # [2B, T] completion mask, float
    ref_logps: torch.Tensor  # [2B, T]
    rewards: torch.Tensor | None  # [2B, T]
    tokens: int  # real (not pad) tokens in the batch

    @property
    def pairs(self) -> int:
        return self.mask.shape[0] // 2


def collate(
    examples: list[PolicyExample],
    pad_id: int,
    device: torch.device,
    pad_multiple: int = 1,
    packing: bool = False,
    packing_tokens: int | None = None,
) -> Batch:
    sides = [e.chosen for e in examples] + [e.rejected for e in examples]
    sequences = [s.prompt_ids + s.completion_ids for s in sides]
    position_ids = attention_mask = None
    if packing:
        layout = pack_layout([len(ids) for ids in sequences], packing_tokens, pad_multiple)
        input_ids, position_ids = packed_tensors(sequences, layout, pad_id)
        where = list(zip(layout.rows, layout.starts))
    else:
        input_ids, attention_mask = padded_batch(sequences, pad_id, pad_multiple)
        where = [(r, 0) for r in range(len(sides))]
    longest = max(len(s.completion_ids) for s in sides)
    mask = torch.zeros((len(sides), longest))
    ref = torch.zeros((len(sides), longest))
    rewards = torch.zeros((len(sides), longest)) if sides[0].rewards is not None else None
    rows, cols, side_of, index = [], [], [], []
    for r, (side, (row, start)) in enumerate(zip(sides, where)):
        p, c = len(side.prompt_ids), len(side.completion_ids)
        mask[r, :c] = 1
        ref[r, :c] = torch.tensor(side.ref_logps)
        if rewards is not None:
            rewards[r, :c] = torch.tensor(side.rewards)
        rows += [row] * c
        cols += range(start + p, start + p + c)
        side_of += [r] * c
        index += range(c)
    to = partial(torch.tensor, dtype=torch.long, device=device)
    return Batch(
        input_ids.to(device),
        attention_mask.to(device) if attention_mask is not None else None,
        position_ids.to(device) if position_ids is not None else None,
        to(rows),
        to(cols),
        to(side_of),
        to(index),
        mask.to(device),
        ref.to(device),
        rewards.to(device) if rewards is not None else None,
        sum(map(len, sequences)),
    )


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, length_grouped: bool, world: int = 1
) -> list[list[int]]:
    """Micro-batches (example indices) of one epoch, a function of (seed, epoch) only, so a resumed run replays it.

    Length grouping sorts each window of ``MEGABATCH`` micro-batches by length, then shuffles the micro-batches, so
    padding drops without feeding lengths in order. Under DDP the list is cut to a multiple of the process count
    (at most ``world - 1`` micro-batches dropped per epoch), so every process runs the same number of backwards.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if length_grouped:
        window = batch_size * MEGABATCH
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if length_grouped:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches[: len(batches) - len(batches) % world]
