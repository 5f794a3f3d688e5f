"""Decoder passes over k completions of each prompt that run every prompt once.

GRPO, RLOO and best-of-k sampling put k completions after each prompt. As k padded rows ``[prompt | completion |
pad]`` the decoder computes every prompt k times. Here each distinct prompt runs once into a KV cache, the cache
is indexed out to one row per completion, and the completions run on top of it: the shared-prefix forward of
Prefix Grouper (Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward",
arXiv 2506.05433). Gradients flow through the cached keys and values into the prompt's pass, so a training
forward is exact: the hidden states of the padded rows, up to float rounding, for about (P/k + C) / (P + C) of
the token work (P prompt and C completion tokens).

Prompts and completions are right-padded, so every row starts with a real token (a row of pads only would be a
query that sees no key: NaN under eager attention); the attention mask hides the pads between a prompt and its
completion, and position ids count real tokens only, so the padding changes no result. Sampling keeps
generate()'s own left padding (:func:`prefill_prompts`).

A layer under activation checkpointing in train mode runs without a cache (transformers drops it: re-running the
layer in backward would append to it twice), so there the rows are run whole, as one pass without sharing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from creditflow.tasks.models.logprobs import DEFAULT_CHUNK, states_logprobs
from creditflow.tasks.models.tokenization import padded_batch


@dataclass
class PromptGroups:
    """Completions grouped by their prompt: each distinct prompt once, the completions that follow it, and where
    every completion token sits (``token_rows``, ``token_index``: completion b, position t, row by row)."""

    prompt_ids: torch.Tensor  # [G, P] the distinct prompts, right-padded
    prompt_mask: torch.Tensor  # [G, P]
    group: torch.Tensor  # [B] the prompt (row of prompt_ids) each completion follows
    completion_ids: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor  # [B, C]
    token_rows: torch.Tensor  # [N]
    token_index: torch.Tensor  # [N]

    @classmethod
    def of(
        cls, prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device
    ) -> PromptGroups:
        """Row b is ``prompts[b] + completions[b]`` (a completion has at least one token); equal prompts (by token
        ids) become one group."""
        index: dict[tuple[int, ...], int] = {}
        group = [index.setdefault(tuple(p), len(index)) for p in prompts]
        prompt_ids, prompt_mask = padded_batch([list(p) for p in index], pad_id)
        completion_ids, completion_mask = padded_batch(completions, pad_id)
        lengths = torch.tensor([len(c) for c in completions])
        token_rows = torch.repeat_interleave(torch.arange(len(completions)), lengths)
        token_index = torch.cat([torch.arange(n) for n in lengths.tolist()])
        tensors = (prompt_ids, prompt_mask, torch.tensor(group), completion_ids, completion_mask)
        return cls(*(t.to(device) for t in (*tensors, token_rows, token_index)))

    @property
    def labels(self) -> torch.Tensor:
        """[N] every completion token, row by row."""
        return self.completion_ids[self.token_rows, self.token_index]

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(1).tolist()

    def scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """[N] per-token values -> [B, C], zero past each completion's end."""
        return flat.new_zeros(self.completion_mask.shape).index_put((self.token_rows, self.token_index), flat)

    def tokens(self) -> int:
        """Real (unpadded) tokens in all rows, every prompt counted once per completion."""
        return int(self.prompt_mask.sum(1)[self.group].sum() + self.completion_mask.sum())

    def whole_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of every completion's whole row, ``[prompt | pad | completion | pad]``."""
        return (
            torch.cat([self.prompt_ids[self.group], self.completion_ids], 1),
            torch.cat([self.prompt_mask[self.group], self.completion_mask], 1),
        )


def completion_states(backbone, groups: PromptGroups) -> torch.Tensor:
    """[B, C, hidden]: the decoder's final hidden states that predict each completion token (column j predicts
    completion token j). ``backbone`` is a causal LM's ``base_model``."""
    return _hidden(backbone, groups, groups.completion_ids.shape[1] - 1)


def final_states(backbone, groups: PromptGroups) -> torch.Tensor:
    """[B, hidden]: the final hidden state at each row's last token, what a sequence classifier reads out."""
    hidden = _hidden(backbone, groups, groups.completion_ids.shape[1])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), groups.completion_mask.sum(1)]


def _hidden(backbone, groups: PromptGroups, columns: int) -> torch.Tensor:
    """[B, 1 + columns, hidden]: final hidden states at each row's last prompt token, then at its first ``columns``
    completion columns."""
    prompt_width = groups.prompt_ids.shape[1]
    lengths = groups.prompt_mask.sum(1)[groups.group]
    last_prompt_token = (torch.arange(len(lengths), device=lengths.device), lengths - 1)
    if backbone.training and backbone.is_activation_checkpointing:
        input_ids, mask = groups.whole_rows()
        input_ids, mask = input_ids[:, : prompt_width + columns], mask[:, : prompt_width + columns]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)
        hidden = hidden.last_hidden_state
        return torch.cat([hidden[last_prompt_token][:, None], hidden[:, prompt_width:]], 1)
    cache = DynamicCache(config=backbone.config)
    prompt_hidden = backbone(
        input_ids=groups.prompt_ids, attention_mask=groups.prompt_mask, past_key_values=cache, use_cache=True
    ).last_hidden_state
    first = prompt_hidden[groups.group][last_prompt_token][:, None]
    if columns == 0:
        return first
    cache.reorder_cache(groups.group)  # one copy of its prompt's keys and values per completion
    rest = backbone(
        input_ids=groups.completion_ids[:, :columns],
        attention_mask=torch.cat([groups.prompt_mask[groups.group], groups.completion_mask[:, :columns]], 1),
        position_ids=lengths[:, None] + torch.arange(columns, device=lengths.device),
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return torch.cat([first, rest], 1)


def token_states(backbone, groups: PromptGroups) -> torch.Tensor:
    """[N, hidden]: the final hidden state that predicts each completion token, row by row."""
    return completion_states(backbone, groups)[groups.token_rows, groups.token_index]


@torch.no_grad()
def grouped_logprobs(model, groups: PromptGroups, chunk_size: int = DEFAULT_CHUNK) -> list[torch.Tensor]:
    """Per-token log-probs (fp32) of each completion under the causal LM ``model``, each prompt run once."""
    flat = states_logprobs(model, token_states(model.base_model, groups), groups.labels, chunk_size)
    return list(flat.split(groups.lengths))


def prefill_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> DynamicCache:
    """A KV cache of every left-padded prompt but its last token, run once and repeated for ``k`` samples each: what
    generate() continues from with the prompts repeated k times, instead of running each prompt k times."""
    cache = DynamicCache(config=model.config)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0)[:, :-1],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(k)
    return cache
