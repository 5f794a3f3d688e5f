"""What a token-reward source is to the token-reward stage: the knobs its cached rows are keyed by, and how it
encodes and scores (prompt, completion) messages. Each source module builds one (``contrastive_source``,
``abc_source``); the stage's ``SOURCES`` table names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from creditflow.tasks.data.schema import Messages


@dataclass
class Source:
    name: str
    knobs: dict[str, Any]  # every input besides the messages that changes this source's rows
    tokenizer: Any  # decodes this source's token ids
    encode: Callable[[list[Messages], list[Messages]], list]  # -> items with .n_forward_tokens
    score: Callable[[list, Any], list[dict[str, Any]]]  # (items, progress) -> cache rows without key/source


@dataclass(frozen=True)
class SourceModels:
    """The models a source may read; each source takes the ones it needs (plain values: Ray workers get a copy)."""

    reference_model: str | None = None  # the policy's reference (contrastive)
    reward_model_dir: str | None = None  # the reward-model stage's model/ (abc)
    rm_max_length: int | None = None  # the reward model's training max_length (abc's default)
