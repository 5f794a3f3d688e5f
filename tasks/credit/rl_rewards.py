"""Rollouts of the RL stage and their rewards: each rollout's outcome (the reward model's score and the user's reward
functions, weighted) and the per-token credit of ``rl.reward_source`` (tasks/recipes/rl.py has the formulas and where
ABC differs from the official code)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from creditflow.tasks.configs import RLConfig
from creditflow.tasks.credit.attention_credit import (
    NoResponseTokens,
    encode_for_abc,
    official_policy_rewards,
    score_abc,
)
from creditflow.tasks.credit.contrastive import ContrastiveItem, contrastive_messages, score_contrastive
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.infer.gold import import_function
from creditflow.tasks.infer.reward_scoring import score_pairs
from creditflow.tasks.models.loading import load_abc_model, load_reference_model, load_reward_model
from creditflow.tasks.models.shared_prompts import PromptGroups, grouped_logprobs
from creditflow.tasks.models.tokenization import encode_prompts, pad_token_id


@dataclass
class Rollout:
    prompt: Messages
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str  # the decoded completion (special tokens skipped), what the reward model reads
    char_start: list[int]  # span of each completion token in ``text``
    char_end: list[int]
    truncated: bool = False  # hit max_new_tokens without a stop token


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[int], list[int]]:
    """(text, start, end) of each token of ``ids`` in their decoded text, from the lengths of decoded prefixes.
    A byte-level token that completes a character later gets an empty span; special tokens (EOS) are empty."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    prefixes = tokenizer.batch_decode([ids[: i + 1] for i in range(len(ids))], skip_special_tokens=True)
    starts, ends, previous = [], [], 0
    for prefix in prefixes:
        end = min(max(len(prefix), previous), len(text))
        starts.append(previous)
        ends.append(end)
        previous = end
    return text, starts, ends


def assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


@dataclass
class RolloutRewards:
    """What the reward side says about a batch of rollouts."""

    scores: list[float]  # each rollout's outcome: reward_model_weight * RM + sum of weight * function
    credit: list[np.ndarray]  # per-token credit of the reward source (zeros for sparse)
    spread: list[float]  # the part of the score ABC already spread over the tokens (inside ``credit``)
    parts: dict[str, list[float]] = field(default_factory=dict)  # the RM's and each function's raw values
    fallbacks: int = 0  # rollouts ABC could not spread (the RM saw none of their tokens): they got it sparse

    def token_rewards(self, i: int) -> np.ndarray:
        """Rollout i's per-token reward for PPO and RLOO: its credit, and the rest of its score on its last token."""
        rewards = self.credit[i].copy()
        rewards[-1] += self.scores[i] - self.spread[i]
        return rewards


class TokenRewards:
    """Rewards of rollouts for ``rl.reward_source``: the reward model (unless its weight is 0), the user's reward
    functions, and the dense credit: ABC from the reward model, contrastive r_hat from pi_ref, the DPO-implicit
    reward of a trained policy (``implicit_model_dir``; RTO, Zhong et al. 2024, "DPO Meets PPO: Reinforced Token
    Optimization for RLHF"), or the user's ``credit_function``."""

    def __init__(
        self,
        reward_model_dir: Path,
        config: RLConfig,
        device: torch.device,
        rm_max_length: int,
        trust_remote_code: bool = False,
        implicit_model_dir: Path | None = None,
        implicit_beta: float = 0.1,
    ):
        self.config, self.device, self.max_length = config, device, rm_max_length
        self.abc = "abc" in config.reward_source
        self.rm = None
        if config.reward_model_weight > 0:
            loader = load_abc_model if self.abc else load_reward_model
            self.rm_tokenizer, self.rm = loader(
                reward_model_dir, device, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
        self.functions = [
            (f"rl.reward_functions[{i}] {f.function!r}", import_function(f.function, f"rl.reward_functions[{i}]"), f)
            for i, f in enumerate(config.reward_functions)
        ]
        self.credit_function = (
            import_function(config.credit_function, "rl.credit_function") if config.credit_function else None
        )
        self.implicit = None
        if config.reward_source == "dpo_implicit":
            if implicit_model_dir is None:
                raise ValueError("rl.reward_source 'dpo_implicit' needs a trained DPO policy (the policy stage)")
            self.implicit = load_reference_model(implicit_model_dir, device, torch.float32, trust_remote_code)
            self.implicit_beta = implicit_beta

    def __call__(self, rollouts: list[Rollout], reference, tokenizer, ref_logps: list[torch.Tensor]) -> RolloutRewards:
        """Rewards of ``rollouts``; ``reference`` is pi_ref and ``ref_logps`` its log-probs of each completion."""
        n = len(rollouts)
        out = RolloutRewards([0.0] * n, [np.zeros(len(r.completion_ids), np.float32) for r in rollouts], [0.0] * n)
        if self.rm is not None:
            self._score_with_rm(rollouts, out)
        for name, function, spec in self.functions:
            values = _call_reward_function(name, function, rollouts)
            out.parts[spec.function] = values
            out.scores = [s + spec.weight * v for s, v in zip(out.scores, values)]
        config = self.config
        if "contrastive" in config.reward_source:
            better, worse = config.contrastive_templates()
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
                out.credit[i] = out.credit[i] + config.contrastive_scale * result.rewards
        if self.credit_function is not None:
            for i, credit in enumerate(_call_credit_function(config.credit_function, self.credit_function, rollouts)):
                out.credit[i] = out.credit[i] + credit
        if self.implicit is not None:
            prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
            groups = PromptGroups.of(prompts, completions, pad_token_id(tokenizer), self.device)
            policy_logps = grouped_logprobs(self.implicit, groups)
            for i, (logp, ref) in enumerate(zip(policy_logps, ref_logps)):
                implicit = self.implicit_beta * (logp.float() - ref.float()).cpu().numpy()
                out.credit[i] = out.credit[i] + implicit.astype(np.float32)
        return out

    def _score_with_rm(self, rollouts: list[Rollout], out: RolloutRewards) -> None:
        """The RM's score of every rollout, weighted into ``out.scores``; with ABC also spread over its tokens."""
        weight = self.config.reward_model_weight
        raw: list[float | None] = [None] * len(rollouts)
        if self.abc:
            items = {}
            for i, r in enumerate(rollouts):
                if r.text.strip():
                    try:
                        items[i] = encode_for_abc(self.rm_tokenizer, r.prompt, assistant(r.text), self.max_length)
                    except NoResponseTokens:  # no attention to spread: r goes on the last token, and is counted
                        pass
            beta = self.config.abc_beta
            results = score_abc(self.rm, list(items.values()), beta, 16, self.rm_tokenizer.pad_token_id)
            for (i, item), result in zip(items.items(), results):
                r = rollouts[i]
                spread = official_policy_rewards(
                    result.rewards, item.char_start, item.char_end, r.char_start, r.char_end, beta
                )
                out.credit[i] = out.credit[i] + weight * spread
                out.spread[i] = weight * float(spread.sum())
                raw[i] = result.reward
        sparse = [i for i, s in enumerate(raw) if s is None]  # all rows, or those ABC could not spread
        out.fallbacks = len(sparse) if self.abc else 0
        if sparse:
            prompts = [rollouts[i].prompt for i in sparse]
            texts = [assistant(rollouts[i].text) for i in sparse]
            for i, value in zip(sparse, score_pairs(self.rm, self.rm_tokenizer, prompts, texts, self.max_length, 16)):
                raw[i] = value
                if self.abc:  # its credit is its reward on the last token, so it still sums to it (GRPO reads it)
                    out.credit[i][-1] += weight * value
                    out.spread[i] = weight * value
        values = [float(v) if v is not None else math.nan for v in raw]  # every row is scored by now
        out.parts["reward_model"] = values
        out.scores = [s + weight * v for s, v in zip(out.scores, values)]


def _call_reward_function(name: str, function, rollouts: list[Rollout]) -> list[float]:
    """``function(prompts, completions)``, checked: one finite number per rollout; any failure names the function."""
    try:
        values = list(function([r.prompt for r in rollouts], [r.text for r in rollouts]))
    except Exception as exc:
        raise RuntimeError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    if len(values) != len(rollouts):
        raise ValueError(f"{name} returned {len(values)} values for {len(rollouts)} completions")
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(
                f"{name} returned {value!r} for completion {i} ({rollouts[i].text[:60]!r}): expected a finite number"
            )
    return [float(v) for v in values]


def _call_credit_function(spec: str, function, rollouts: list[Rollout]) -> list[np.ndarray]:
    """``function(rollouts)``, checked: per rollout, one finite number per completion token; failures name it."""
    name = f"rl.credit_function {spec!r}"
    try:
        values = list(function(rollouts))
    except Exception as exc:
        raise RuntimeError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    if len(values) != len(rollouts):
        raise ValueError(f"{name} returned {len(values)} credit rows for {len(rollouts)} rollouts")
    out = []
    for i, (row, rollout) in enumerate(zip(values, rollouts)):
        try:
            credit = np.asarray(row, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: rollout {i}'s credit is not a sequence of numbers ({exc})") from None
        if credit.shape != (len(rollout.completion_ids),):
            raise ValueError(
                f"{name}: rollout {i} ({rollout.text[:60]!r}) has {len(rollout.completion_ids)} tokens, its credit "
                f"has shape {credit.shape}"
            )
        if not np.isfinite(credit).all():
            first = int(np.argmin(np.isfinite(credit)))
            raise ValueError(f"{name}: rollout {i}'s credit is {credit[first]} at token {first}: expected finite")
        out.append(credit)
    return out
