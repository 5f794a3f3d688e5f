"""Rollouts of the RL stage and their per-token rewards for each ``rl.reward_source`` (tasks/recipes/rl.py has the
formulas and where they differ from the official ABC code)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from creditflow.tasks.configs import TEMPLATE_PRESETS, RLConfig
from creditflow.tasks.credit.attention_credit import (
    NoResponseTokens,
    encode_for_abc,
    official_policy_rewards,
    score_abc,
)
from creditflow.tasks.credit.contrastive import ContrastiveItem, contrastive_messages, score_contrastive
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.infer.reward_scoring import score_pairs
from creditflow.tasks.models.loading import load_abc_model, load_reward_model
from creditflow.tasks.models.tokenization import encode_prompts, pad_token_id


@dataclass
class Rollout:
    prompt: Messages
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str  # the decoded completion (special tokens skipped), what the reward model reads
    char_start: list[int]  # span of each completion token in ``text``
    char_end: list[int]


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[int], list[int]]:
    """(text, start, end) of each token of ``ids`` in their decoded text, from the lengths of decoded prefixes.
    A byte-level token that completes a character later gets an empty span; special tokens (EOS) are empty."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    starts, ends, previous = [], [], 0
    for i in range(len(ids)):
        end = min(max(len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)), previous), len(text))
        starts.append(previous)
        ends.append(end)
        previous = end
    return text, starts, ends


def assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


class TokenRewards:
    """Per-token rewards of rollouts for ``reward_source``, from the reward model (and pi_ref for contrastive)."""

    def __init__(
        self,
        reward_model_dir: Path,
        config: RLConfig,
        device: torch.device,
        rm_max_length: int,
        trust_remote_code: bool = False,
    ):
        self.config, self.device, self.max_length = config, device, rm_max_length
        abc = "abc" in config.reward_source
        loader = load_abc_model if abc else load_reward_model
        self.rm_tokenizer, self.rm = loader(
            reward_model_dir, device, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
        self.abc = abc

    def __call__(self, rollouts: list[Rollout], reference, tokenizer) -> tuple[list[np.ndarray], list[float], int]:
        """(per-token rewards, the reward model's score r of each rollout, how many rollouts an abc source gave the
        sparse reward because the reward model saw none of their tokens: empty or truncated away)."""
        config = self.config
        rewards = [np.zeros(len(r.completion_ids), dtype=np.float32) for r in rollouts]
        scores: list[float | None] = [None] * len(rollouts)
        if self.abc:
            items = {}
            for i, r in enumerate(rollouts):
                if r.text.strip():
                    try:
                        items[i] = encode_for_abc(self.rm_tokenizer, r.prompt, assistant(r.text), self.max_length)
                    except NoResponseTokens:  # no attention to spread: r goes on the last token, and is counted
                        pass
            results = score_abc(self.rm, list(items.values()), config.abc_beta, 16, self.rm_tokenizer.pad_token_id)
            for (i, item), result in zip(items.items(), results):
                r = rollouts[i]
                rewards[i] = official_policy_rewards(
                    result.rewards, item.char_start, item.char_end, r.char_start, r.char_end, config.abc_beta
                )
                scores[i] = result.reward
        sparse = [i for i, s in enumerate(scores) if s is None]  # all rows, or those ABC could not spread
        fallbacks = len(sparse) if self.abc else 0
        if sparse:
            values = score_pairs(
                self.rm,
                self.rm_tokenizer,
                [rollouts[i].prompt for i in sparse],
                [assistant(rollouts[i].text) for i in sparse],
                self.max_length,
                16,
            )
            for i, value in zip(sparse, values):
                rewards[i][-1] += value
                scores[i] = value
        if "contrastive" in config.reward_source:
            better, worse = TEMPLATE_PRESETS[config.contrastive_template]
            items = [
                ContrastiveItem(
                    r.completion_ids,
                    r.char_start,
                    r.char_end,
                    r.prompt_ids,
                    encode_prompts(tokenizer, [contrastive_messages(r.prompt, r.text, better)])[0],
                    encode_prompts(tokenizer, [contrastive_messages(r.prompt, r.text, worse)])[0],
                )
                for r in rollouts
            ]
            for i, result in enumerate(score_contrastive(reference, items, 16, pad_token_id(tokenizer))):
                rewards[i] = rewards[i] + config.contrastive_scale * result.rewards
        return rewards, [float(s) for s in scores], fallbacks
