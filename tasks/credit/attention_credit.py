"""Attention-Based Credit (Chan, Sun, Holt, van der Schaar 2024, "Dense Reward for Free in Reinforcement Learning
from Human Feedback", ICML, arXiv 2402.00782; official code XanderJC/attention-based-credit; the spec is
docs/algorithms.md, "Attention-Based Credit").

The reward model's scalar r is spread over the response tokens by the attention the read-out position pays them:

    a_t = A[read, t] / sum_{j in response} A[read, j]          A: last layer, mean over heads (eager attention, fp32)
    r_t = beta * a_t * r + (1 - beta) * r * [t = last response token]

so sum_t r_t = r exactly (the return of every response is unchanged; beta = 0 is the sparse RLHF reward). The
read-out position is the one the reward is taken from: the last non-pad token for decoder reward models, CLS
(position 0) for bidirectional encoders (BERT, MiniLM). Attention paid to prompt and template tokens is dropped.

The reward model sees (prompt, response) exactly as the reward-model stage scores it (``encode_for_reward`` in
tasks/infer/reward_scoring.py: the chat-rendered conversation cut from the left, or a text pair for template-less
encoders), so r is the model's real score. Its tokens are the reward model's, not the policy's: rows store the RM's
token ids and their character spans in ``completion_text``, and :func:`project_rewards` moves the rewards onto
the policy's completion tokens through those spans, preserving the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.utils.output_capturing import OutputRecorder

from creditflow.storage.hashing import code_version, reached_modules
from creditflow.tasks.configs import TokenRewardsConfig
from creditflow.tasks.credit.source import Source, SourceModels
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.infer.reward_scoring import encode_for_reward, render_conversations, reward_values
from creditflow.tasks.models import tokenization
from creditflow.tasks.models.loading import load_abc_model
from creditflow.tasks.models.precision import inference_dtype
from creditflow.tasks.models.resolve import model_fingerprint
from creditflow.tasks.models.tokenization import completion_offsets, pad_right


def abc_token_rewards(attention: torch.Tensor, reward: float, beta: float) -> torch.Tensor:
    """r_t from the read-out row's head-averaged attention over the T response tokens ([T], any positive scale)."""
    weights = attention.double() / attention.double().sum()
    rewards = beta * weights * reward
    rewards[-1] += (1.0 - beta) * reward
    return rewards.float()


class NoResponseTokens(ValueError):
    """The reward model sees no token of the response (it is empty, or truncation cut it): no attention to spread."""


@dataclass
class AbcItem:
    """A (prompt, response) as the reward model reads it, and where the response tokens are."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    response_positions: list[int]  # indices into input_ids, ascending
    char_start: list[int]  # span of each response token in completion_text(completion)
    char_end: list[int]

    @property
    def response_ids(self) -> list[int]:
        return [self.input_ids[p] for p in self.response_positions]

    @property
    def n_forward_tokens(self) -> int:
        return len(self.input_ids)


def encode_for_abc(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, completion: Messages, max_length: int
) -> AbcItem:
    """The reward model's input (``encode_for_reward``) with the response tokens located by offsets."""
    encoded = encode_for_reward(tokenizer, [prompt], [completion], max_length, offsets=True)
    if tokenizer.chat_template:
        located = _locate_completion(render_conversations(tokenizer, [prompt], [completion])[0], completion)
        positions, starts, ends = [], [], []
        for position, (a, b) in enumerate(encoded["offset_mapping"][0]):
            for rendered_start, rendered_end, text_start in located:
                lo, hi = max(a, rendered_start), min(b, rendered_end)
                if lo < hi:
                    positions.append(position)
                    starts.append(text_start + lo - rendered_start)
                    ends.append(text_start + hi - rendered_start)
                    break
    else:
        positions = [i for i, s in enumerate(encoded.sequence_ids(0)) if s == 1]
        starts = [encoded["offset_mapping"][0][i][0] for i in positions]
        ends = [encoded["offset_mapping"][0][i][1] for i in positions]
    if not positions:
        raise NoResponseTokens(f"no response token survives the reward model's max_length {max_length}")
    types = encoded.get("token_type_ids")
    return AbcItem(encoded["input_ids"][0], types[0] if types is not None else None, positions, starts, ends)


def _locate_completion(rendered: str, completion: Messages) -> list[tuple[int, int, int]]:
    """(start, end) of each completion message's text in the rendered conversation, with its offset in
    ``completion_text`` (messages joined by newlines). Searched from the end: the response comes last."""
    bases = np.cumsum([0] + [len(m["content"]) + 1 for m in completion[:-1]])
    located, cursor = [], len(rendered)
    for message, base in zip(reversed(completion), reversed(bases.tolist())):
        content = message["content"]
        stripped = content.strip()  # many templates trim message content
        found = rendered.rfind(stripped, 0, cursor)
        if found < 0:
            raise ValueError("the reward model's chat template does not render the response text verbatim")
        located.append((found, found + len(stripped), base + len(content) - len(content.lstrip())))
        cursor = found
    return located


def is_encoder(model) -> bool:
    """Bidirectional encoders (model types with a masked-LM head) pool at CLS; decoders read the last token."""

    return model.config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _last_attention_module(model):
    """The last self-attention module of the backbone (the class transformers records ``attentions`` from)."""

    spec = getattr(model.base_model, "_can_record_outputs", {}).get("attentions")
    target = spec.target_class if isinstance(spec, OutputRecorder) else spec
    modules = [m for m in model.base_model.modules() if isinstance(target, type) and isinstance(m, target)]
    if not modules:
        raise ValueError(f"{type(model).__name__}: cannot find its attention layers for ABC")
    return modules[-1]


@dataclass
class AbcResult:
    reward: float  # the reward model's scalar r
    rewards: np.ndarray  # float32 [T] over the RM's response tokens; sums to r


@torch.no_grad()
def score_abc(model, items: list[AbcItem], beta: float, batch_size: int, pad_id: int, progress=None) -> list[AbcResult]:
    """One reward-model forward per item (batched longest first); the last layer's attention row comes from a hook,
    so no other layer's [B, H, S, S] map is kept."""
    device = next(model.parameters()).device
    encoder = is_encoder(model)
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    captured: dict[str, torch.Tensor] = {}

    def keep_read_row(module, args, output):
        weights = output[1]
        if weights is None:
            raise RuntimeError("the reward model returned no attention weights; load it with eager attention")
        rows = weights[torch.arange(weights.shape[0], device=weights.device), :, captured["read"]]  # [B, H, S]
        captured["attention"] = rows.float().mean(dim=1)

    results: list[AbcResult | None] = [None] * len(items)
    handle = _last_attention_module(model).register_forward_hook(keep_read_row)
    try:
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start : start + batch_size]]
            width = len(batch[0].input_ids)
            attention_mask = pad_right([[1] * len(item.input_ids) for item in batch], 0)
            inputs = {
                "input_ids": pad_right([item.input_ids for item in batch], pad_id),
                "attention_mask": attention_mask,
            }
            if batch[0].token_type_ids is not None:
                inputs["token_type_ids"] = pad_right([item.token_type_ids for item in batch], 0)
            inputs = {key: value.to(device) for key, value in inputs.items()}
            if encoder:
                captured["read"] = torch.zeros(len(batch), dtype=torch.long, device=device)
            else:  # the model's own rule: the rightmost token that is not the pad id
                non_pad = (inputs["input_ids"] != model.config.pad_token_id).long()
                captured["read"] = (torch.arange(width, device=device) * non_pad).argmax(-1)
            scores = reward_values(model(**inputs)).cpu()
            attention = captured["attention"].cpu()
            for r, (i, item) in enumerate(zip(order[start : start + batch_size], batch)):
                row = attention[r, item.response_positions]
                results[i] = AbcResult(float(scores[r]), abc_token_rewards(row, float(scores[r]), beta).numpy())
            if progress is not None:
                progress.update(int(attention_mask.sum()))
    finally:
        handle.remove()
    return results


def project_rewards(
    rewards: list[float] | np.ndarray,
    char_start: list[int],
    char_end: list[int],
    target_start: list[int],
    target_end: list[int],
) -> np.ndarray:
    """Move per-token rewards from one tokenization of a text onto another through character spans; sums match.

    Each source token's reward is split over the target tokens its span overlaps, in proportion to the overlapping
    characters. A source token that overlaps none (its text was cut off by the target's truncation, or it is
    zero-width) gives its reward to the last target token starting at or before it. Zero-width target tokens
    (EOS) receive nothing unless they are that fallback.
    """
    if not len(target_start):
        raise ValueError("cannot project rewards onto zero target tokens")
    s0, e0 = np.asarray(char_start)[:, None], np.asarray(char_end)[:, None]
    s1, e1 = np.asarray(target_start)[None, :], np.asarray(target_end)[None, :]
    overlap = np.clip(np.minimum(e0, e1) - np.maximum(s0, s1), 0, None).astype(np.float64)
    totals = overlap.sum(axis=1, keepdims=True)
    weights = np.divide(overlap, totals, out=np.zeros_like(overlap), where=totals > 0)
    orphans = np.flatnonzero(totals[:, 0] == 0)
    fallback = np.clip(np.searchsorted(np.asarray(target_start), s0[orphans, 0], side="right") - 1, 0, None)
    weights[orphans, fallback] = 1.0
    return (np.asarray(rewards, dtype=np.float64) @ weights).astype(np.float32)


def regularizer_rewards(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    completion: Messages,
    n_tokens: int,
    beta: float,
    reward_mean: float,
    reward_std: float,
) -> np.ndarray:
    """ABC as a T-REG r̂ on the policy's first ``n_tokens`` completion tokens: centered and bounded like the
    contrastive r̂, unlike the official form (whose every token takes the sign of r, scaled by the RM's arbitrary
    offset, with (1 − β)·r on the last RM token).

        a_t = (r_t − (1 − β)·r·[t = last]) / (β·r)      the attention shares (≥ 0, sum 1), recovered from the row
        a'  = a projected onto the policy's tokens (sum 1)
        z   = (r − mean) / std                           r standardized over the rows being trained on
        r̂_t = σ(z · T · a'_t) − 0.5  ∈ (−0.5, 0.5)       T = number of policy tokens

    A response as good as the average gets 0 everywhere; uniform attention gives every token σ(z) − 0.5; tokens the
    read-out attends to more get a larger share of the sign. With β = 0 or r ≈ 0 the shares are uniform.
    """
    reward, shares = attention_shares(row["rewards"], beta)
    spans = completion_offsets(tokenizer, [completion])[0][:n_tokens]
    targets = [s for s, _ in spans], [e for _, e in spans]
    projected = project_rewards(shares, row["char_start"], row["char_end"], *targets)
    return bounded_rewards((reward - reward_mean) / max(reward_std, 1e-8), projected)


def attention_shares(rewards, beta: float) -> tuple[float, np.ndarray]:
    """(r, a) from an official-form row: r = Σ r_t, a_t = (r_t − (1 − β)·r·[t = last]) / (β·r), uniform when β = 0
    or r ≈ 0 (the row then carries no attention information)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    reward = float(rewards.sum())
    if beta > 0 and abs(reward) > 1e-8:
        shares = rewards.copy()
        shares[-1] -= (1.0 - beta) * reward
        shares = np.clip(shares / (beta * reward), 0.0, None)
    else:
        shares = np.ones_like(rewards)
    return reward, shares / shares.sum()


def bounded_rewards(z: float, shares: np.ndarray) -> np.ndarray:
    """σ(z · T · a_t) − 0.5 for T = len(shares): the standardized reward z spread by the shares, in (−0.5, 0.5)."""
    shares = np.asarray(shares, dtype=np.float64)
    return (1.0 / (1.0 + np.exp(-z * len(shares) * shares)) - 0.5).astype(np.float32)


def project_to_policy(row: dict, tokenizer: PreTrainedTokenizerBase, completion: Messages, n_tokens: int) -> np.ndarray:
    """ABC rewards of a stored row on the policy's first ``n_tokens`` completion tokens (``encode_pair`` ids)."""
    spans = completion_offsets(tokenizer, [completion])[0][:n_tokens]
    return project_rewards(
        row["rewards"], row["char_start"], row["char_end"], [s for s, _ in spans], [e for _, e in spans]
    )


def official_policy_rewards(
    rm_rewards, rm_char_start, rm_char_end, policy_char_start, policy_char_end, beta: float
) -> np.ndarray:
    """ABC's official form on the policy's response tokens, for online RL:

        r_t = beta * r * a'_t + (1 - beta) * r * [t = last policy token]        sum_t r_t = r

    a' is the attention shares moved from the reward model's tokens onto the policy's through character spans. The
    remainder lands on the policy's own last token (its EOS when it stopped, else the last sampled token), not on
    whichever policy token overlaps the reward model's last one."""
    reward, shares = attention_shares(rm_rewards, beta)
    projected = project_rewards(shares, rm_char_start, rm_char_end, policy_char_start, policy_char_end)
    rewards = beta * reward * projected.astype(np.float64)
    rewards[-1] += (1.0 - beta) * reward
    return rewards.astype(np.float32)


def abc_source(config: TokenRewardsConfig, device, models: SourceModels, trust_remote_code: bool = False) -> Source:
    """ABC on the reward model in ``models.reward_model_dir`` (the reward-model stage's ``model/``)."""

    folder, dtype = Path(models.reward_model_dir), inference_dtype(config.dtype, device)
    tokenizer, model = load_abc_model(folder, device, dtype, trust_remote_code)
    max_length = config.abc_max_length or models.rm_max_length
    knobs = {
        "reward_model": model_fingerprint(folder),
        "tokenizer": tokenization.tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "beta": config.abc_beta,
        "dtype": str(dtype),
        "code": code_version(reached_modules([__name__])),  # this module and all it imports
    }

    def encode(prompts: list[Messages], completions: list[Messages]) -> list[AbcItem]:
        return [encode_for_abc(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]

    def score(items: list[AbcItem], progress) -> list[dict[str, Any]]:
        results = score_abc(model, items, config.abc_beta, config.batch_size, tokenizer.pad_token_id, progress)
        return [
            {
                "n_tokens": len(item.response_positions),
                "token_ids": item.response_ids,
                "char_start": item.char_start,
                "char_end": item.char_end,
                "rewards": result.rewards,
                "ref_logps": None,
            }
            for item, result in zip(items, results)
        ]

    return Source("abc", knobs, tokenizer, encode, score)
