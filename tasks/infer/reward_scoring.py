"""How a reward model reads (prompt, completion) and scores it: shared by its training, on-policy relabelling,
evaluation and ABC, so every one of them scores exactly what the reward model was trained on.

With a chat template the whole conversation is rendered and cut from the left when too long (the reward is read
at the end). Without one (encoders such as MiniLM) the prompt and the response are a text pair, truncated
longest-first.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from transformers.modeling_layers import GenericForSequenceClassification

from creditflow.tasks.config_base import ComputeConfig
from creditflow.tasks.data.schema import Messages, completion_text, exact_key
from creditflow.tasks.infer.distributed import resumable_map
from creditflow.tasks.models.loading import load_reward_model
from creditflow.tasks.models.precision import autocast, resolve_device
from creditflow.tasks.models.shared_prompts import PromptGroups, final_states
from creditflow.tasks.models.tokenization import pad_right


def render_conversations(tokenizer, prompts: list[Messages], completions: list[Messages]) -> list[str]:
    """Chat-template text of each full conversation (the reward model's input when it has a template)."""
    return tokenizer.apply_chat_template(
        [p + c for p, c in zip(prompts, completions)], tokenize=False, add_generation_prompt=False
    )


def prompt_texts(prompts: list[Messages]) -> list[str]:
    """The first text of a (prompt, response) pair for template-less encoders."""
    return ["\n\n".join(m["content"] for m in p) for p in prompts]


@contextmanager
def _truncate_left(tokenizer):
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        yield
    finally:
        tokenizer.truncation_side = side


def encode_for_reward(
    tokenizer, prompts: list[Messages], completions: list[Messages], max_length: int, offsets: bool = False
):
    """Token ids (a BatchEncoding) the reward model sees for each (prompt, completion)."""
    if tokenizer.chat_template:
        with _truncate_left(tokenizer):
            return tokenizer(
                render_conversations(tokenizer, prompts, completions),
                add_special_tokens=False,
                truncation=True,
                max_length=max_length,
                return_offsets_mapping=offsets,
            )
    return tokenizer(
        prompt_texts(prompts),
        [completion_text(c) for c in completions],
        truncation="longest_first",
        max_length=max_length,
        return_offsets_mapping=offsets,
    )


def reward_values(output) -> torch.Tensor:
    """[B] fp32 rewards from a reward model's output: the ``score`` a custom-code reward model returns (ArmoRM's
    preference score) when it has one, else a sequence classifier's first logit."""
    score = getattr(output, "score", None)
    values = score if isinstance(score, torch.Tensor) else output.logits
    return values.reshape(values.shape[0], -1)[:, 0].float()


def reward_batch(encoded, rows: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded model inputs for ``rows`` of an encoding (token_type_ids too when the tokenizer makes them)."""
    batch = {}
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in encoded:
            batch[key] = pad_right([encoded[key][i] for i in rows], fill).to(device)
    return batch


@torch.no_grad()
def score_pairs(model, tokenizer, prompts, completions, max_length: int, batch_size: int, device=None) -> list[float]:
    """Scalar reward of every (prompt, completion), batched longest first; results in input order. ``device``: where
    the forward runs, by default the parameters' device (FSDP with CPU offload keeps those on the CPU)."""
    device = device or next(model.parameters()).device
    encoded = encode_for_reward(tokenizer, prompts, completions, max_length)
    if isinstance(model, GenericForSequenceClassification) and "token_type_ids" not in encoded:
        scores = _score_shared_prompts(model, prompts, encoded["input_ids"], batch_size, device)
        if scores is not None:
            return scores
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded["input_ids"][i]))
    scores = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        with autocast(device, bf16=True):
            rewards = reward_values(model(**reward_batch(encoded, rows, tokenizer.pad_token_id, device)))
        for i, reward in zip(rows, rewards.tolist()):
            scores[i] = reward
    return scores


def _score_shared_prompts(
    model, prompts: list[Messages], rows: list[list[int]], batch_size: int, device
) -> list[float] | None:
    """:func:`score_pairs` for a decoder sequence classifier: the rows of one prompt run the tokens they all start
    with once (tasks/models/shared_prompts.py), in batches of whole prompts; None when no two rows share a prompt.
    The read-out is the classifier's own, the rightmost token that is not its pad id; tokens after it cannot change
    it and are dropped."""
    pad = model.config.get_text_config().pad_token_id
    rows = [ids[: max((i for i, t in enumerate(ids) if t != pad), default=len(ids) - 1) + 1] for ids in rows]
    by_prompt: dict[tuple, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(exact_key(prompt), []).append(i)
    if max(len(members) for members in by_prompt.values()) < 2:
        return None
    shared = [0] * len(rows)
    for members in by_prompt.values():
        length = _common_prefix([rows[i] for i in members])
        for i in members:
            shared[i] = min(length, len(rows[i]) - 1)  # every row keeps its read-out token
    if min(shared) == 0:  # a one-token row, or a prompt whose rows share no token
        return None
    scores = [0.0] * len(rows)
    groups = sorted(by_prompt.values(), key=lambda members: -max(len(rows[i]) for i in members))
    batch: list[int] = []
    for position, members in enumerate(groups):
        batch += members
        if len(batch) < batch_size and position + 1 < len(groups):
            continue
        prefixes, rests = [rows[i][: shared[i]] for i in batch], [rows[i][shared[i] :] for i in batch]
        prompt_groups = PromptGroups.of(prefixes, rests, pad if pad is not None else 0, device)
        with autocast(device, bf16=True):
            values = model.score(final_states(model.base_model, prompt_groups))[:, 0].float()
        for i, value in zip(batch, values.tolist()):
            scores[i] = value
        batch = []
    return scores


def _common_prefix(rows: list[list[int]]) -> int:
    first, length = rows[0], min(len(r) for r in rows)
    for row in rows[1:]:
        length = next((j for j in range(length) if row[j] != first[j]), length)
    return length


ROWS_PER_SHARD = 512  # (prompt, completion) rows per shard of :func:`score_rewards`


class RewardScorer:
    """A trained reward model folder as a scorer of (prompt, completion) batches."""

    def __init__(
        self,
        folder: str | Path,
        max_length: int = 512,
        batch_size: int = 32,
        device: str = "auto",
        trust_remote_code: bool = False,
    ):
        self.tokenizer, self.model = load_reward_model(folder, resolve_device(device), trust_remote_code)
        self.max_length, self.batch_size = max_length, batch_size

    def score(self, prompts: list[Messages], completions: list[Messages]) -> list[float]:
        return score_pairs(self.model, self.tokenizer, prompts, completions, self.max_length, self.batch_size)

    def __call__(self, shard: tuple[list[Messages], list[Messages]]) -> list[float]:
        return self.score(*shard)


def score_rewards(
    folder: str | Path,
    jobs: list[tuple[list[Messages], list[Messages]]],
    compute: ComputeConfig | None = None,
    store=None,
    progress: bool = True,
    rows_per_shard: int = ROWS_PER_SHARD,
    trust_remote_code: bool = False,
) -> list[list[float]]:
    """:meth:`RewardScorer.score` of every (prompts, completions) job, one list of scores per job, in shards of
    ``rows_per_shard`` rows (input order) that never span two jobs, so each job is batched as a call of its own
    would be. The reward model is loaded once here, or once per Ray actor; finished shards go to ``store``
    (storage.shard_results.ShardResults)."""
    shards, owners = [], []
    for job, (prompts, completions) in enumerate(jobs):
        for start in range(0, len(prompts), rows_per_shard):
            shards.append((prompts[start : start + rows_per_shard], completions[start : start + rows_per_shard]))
            owners.append(job)
    build = partial(RewardScorer, str(folder), trust_remote_code=trust_remote_code)  # picklable: Ray actors too
    done = resumable_map(shards, build, compute, store, "reward scores", progress)
    scores: list[list[float]] = [[] for _ in jobs]
    for job, rows in zip(owners, done):
        scores[job] += rows
    return scores
