"""T-REG token rewards by contrastive prompting (Zhou et al. 2024, "T-REG: Preference Optimization with Token-Level
Reward Regularization", arXiv 2412.02685; the spec is docs/algorithms.md, "Contrastive token rewards").

The reference model pi_ref scores every response token twice, once after a prompt asking to make the response
better and once after a prompt asking to make it worse:

    r_hat_t = sigmoid( log pi_ref(y_t | x_better, y_<t) - log pi_ref(y_t | x_worse, y_<t) ) - 0.5     in (-0.5, 0.5)

r_hat_t > 0 marks a token the model finds more likely when asked for a better answer. The same pass scores y under
the plain prompt x, giving the reference log-probs log pi_ref(y_t | x, y_<t) that DPO needs, so the trainer can skip
its own reference pass.

Alignment: y is exactly the completion ids the trainer uses, ``encode_pair(...)[1]`` (chat template, EOS,
truncation); the three prompts are tokenized on their own and the ids concatenated, never re-tokenized as joined
text. The revision prompts embed the whole last user turn and the response text the trainer sees (the truncated
one when truncation cut it); they are not truncated themselves, so those rows run to about
|template| + |instruction| + 2 |y| tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from creditflow.storage.hashing import code_version, reached_modules, sha256_text
from creditflow.tasks.configs import TokenRewardsConfig
from creditflow.tasks.credit.source import Source, SourceModels
from creditflow.tasks.data.schema import Messages, completion_text
from creditflow.tasks.models import tokenization
from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
from creditflow.tasks.models.logprobs import DEFAULT_CHUNK, completion_logprobs
from creditflow.tasks.models.precision import reference_precision
from creditflow.tasks.models.resolve import model_fingerprint, resolve_model
from creditflow.tasks.models.tokenization import (
    completion_offsets,
    encode_completions,
    encode_prompts,
    padded_batch,
    truncate_pair,
)


def contrastive_messages(prompt: Messages, response: str, template: str) -> Messages:
    """The prompt with its last user turn rewritten by ``template`` (which embeds that turn, and the response when
    the template has a ``{response}`` placeholder)."""
    last_user = max((i for i, m in enumerate(prompt) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("contrastive prompting needs a prompt with a user turn")
    turn = {"role": "user", "content": template.format(instruction=prompt[last_user]["content"], response=response)}
    return [*prompt[:last_user], turn, *prompt[last_user + 1 :]]


@dataclass
class ContrastiveItem:
    """One response ready to score: its completion ids (as trained), their character spans, and three prompts."""

    completion_ids: list[int]
    char_start: list[int]
    char_end: list[int]
    plain_ids: list[int]
    better_ids: list[int]
    worse_ids: list[int]
    truncated: bool = False  # truncate_pair cut the prompt or the completion

    @property
    def n_forward_tokens(self) -> int:
        return len(self.plain_ids) + len(self.better_ids) + len(self.worse_ids) + 3 * len(self.completion_ids)


def encode_contrastive(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    completions: list[Messages],
    config: TokenRewardsConfig,
) -> list[ContrastiveItem]:
    """Token ids of every (prompt, completion): truncated with ``truncate_pair`` exactly as ``encode_pair`` does."""
    plain = encode_prompts(tokenizer, prompts)
    full = encode_completions(tokenizer, completions)
    spans = completion_offsets(tokenizer, completions)
    better_template, worse_template = config.templates()
    items, better_turns, worse_turns = [], [], []
    for prompt, completion, prompt_ids, completion_ids, span in zip(prompts, completions, plain, full, spans):
        lengths = len(prompt_ids), len(completion_ids)
        prompt_ids, completion_ids = truncate_pair(
            prompt_ids, completion_ids, config.max_length, config.max_prompt_length, config.truncation
        )
        truncated = (len(prompt_ids), len(completion_ids)) != lengths
        span = span[: len(completion_ids)]
        # The text of the kept tokens: the whole response unless truncation cut its tail.
        response = completion_text(completion)[: span[-1][1]]
        better_turns.append(contrastive_messages(prompt, response, better_template))
        worse_turns.append(contrastive_messages(prompt, response, worse_template))
        items.append((completion_ids, [s for s, _ in span], [e for _, e in span], prompt_ids, truncated))
    better = encode_prompts(tokenizer, better_turns)
    worse = encode_prompts(tokenizer, worse_turns)
    return [ContrastiveItem(*item[:4], b, w, item[4]) for item, b, w in zip(items, better, worse)]


def contrastive_rewards(logp_better: torch.Tensor, logp_worse: torch.Tensor) -> torch.Tensor:
    """r_hat_t = sigmoid(logp_better_t - logp_worse_t) - 0.5 (T-REG eq. for self-generated token rewards)."""
    return torch.sigmoid(logp_better - logp_worse) - 0.5


@dataclass
class ContrastiveResult:
    rewards: np.ndarray  # float32 [T]
    ref_logps: np.ndarray  # float32 [T], log pi_ref(y_t | x, y_<t) under the plain prompt


@torch.no_grad()
def score_contrastive(
    model,
    items: list[ContrastiveItem],
    batch_size: int,
    pad_id: int,
    progress=None,
    chunk_size: int = DEFAULT_CHUNK,
) -> list[ContrastiveResult]:
    """Three forward passes per item (better, worse, plain prompt), batched longest first to keep padding low.

    ``progress`` (a tqdm bar or None) advances by the non-pad tokens of each batch.
    """
    device = next(model.parameters()).device
    prompts = {"better": [it.better_ids for it in items], "worse": [it.worse_ids for it in items]}
    prompts["plain"] = [it.plain_ids for it in items]
    sequences = [(kind, i) for kind in prompts for i in range(len(items))]
    sequences.sort(key=lambda s: -(len(prompts[s[0]][s[1]]) + len(items[s[1]].completion_ids)))
    logps: dict[tuple[str, int], torch.Tensor] = {}
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        rows = [prompts[kind][i] + items[i].completion_ids for kind, i in batch]
        input_ids, attention_mask = padded_batch(rows, pad_id)
        out = completion_logprobs(
            model,
            input_ids.to(device),
            attention_mask.to(device),
            [len(prompts[kind][i]) for kind, i in batch],
            [len(items[i].completion_ids) for _, i in batch],
            chunk_size,
        )
        logps.update(zip(batch, (lp.cpu() for lp in out)))
        if progress is not None:
            progress.update(sum(len(r) for r in rows))
    return [
        ContrastiveResult(
            rewards=contrastive_rewards(logps["better", i], logps["worse", i]).numpy(),
            ref_logps=logps["plain", i].numpy(),
        )
        for i in range(len(items))
    ]


def contrastive_source(
    config: TokenRewardsConfig, device, models: SourceModels, trust_remote_code: bool = False
) -> Source:
    """T-REG contrastive prompting on the reference model (whose tokenizer is the policy's)."""

    precision = reference_precision(config.dtype, device, config.policy_precision)
    folder = resolve_model(models.reference_model)
    tokenizer = load_tokenizer(str(folder), trust_remote_code)
    knobs = {
        "model": model_fingerprint(folder),
        "tokenizer": tokenization.tokenizer_fingerprint(tokenizer),
        "template": config.template,
        **{name: sha256_text(text) for name, text in zip(("better_template", "worse_template"), config.templates())},
        "max_length": config.max_length,
        "max_prompt_length": config.max_prompt_length,
        "truncation": config.truncation,
        "dtype": precision.label,  # the policy stage checks it against its own
        "code": code_version(reached_modules([__name__])),  # this module and all it imports
    }
    model = None
    pad_id = tokenization.pad_token_id(tokenizer)

    def score(items: list[ContrastiveItem], progress) -> list[dict[str, Any]]:
        nonlocal model
        if model is None:  # loaded on first use: a fully cached run never loads it
            model = load_reference_model(folder, device, precision.weights, trust_remote_code)
        with precision.autocast(device):
            results = score_contrastive(model, items, config.batch_size, pad_id, progress)
        return [
            {
                "n_tokens": len(item.completion_ids),
                "token_ids": item.completion_ids,
                "char_start": item.char_start,
                "char_end": item.char_end,
                "rewards": result.rewards,
                "ref_logps": result.ref_logps,
            }
            for item, result in zip(items, results)
        ]

    return Source("contrastive", knobs, tokenizer, lambda p, c: encode_contrastive(tokenizer, p, c, config), score)
