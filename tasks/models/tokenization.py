"""Tokenization shared by every stage, so curation's length limits count exactly the tokens training will see.

Prompt ids come from the chat template with a generation prompt; completion ids are the completion text
without special tokens, followed by EOS. Later stages concatenate these id lists and never re-tokenize joined text.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from creditflow.storage.hashing import sha256_json
from creditflow.tasks.configs import TRUNCATION_MODES
from creditflow.tasks.data.schema import Messages, completion_text


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Digest of everything that changes token ids: vocab/merges/normalizers, chat template, special tokens."""
    backend = (
        tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else repr(tokenizer.get_vocab())
    )
    return sha256_json(
        {
            "backend": backend,
            "chat_template": tokenizer.chat_template,
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "class": type(tokenizer).__name__,
        }
    )


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Messages]) -> list[str]:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token or ""
    return [bos + "\n\n".join(m["content"] for m in prompt) + "\n\n" for prompt in prompts]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Messages]) -> list[list[int]]:
    # The rendered template already carries BOS where the model wants it.
    return tokenizer(render_prompts(tokenizer, prompts), add_special_tokens=False)["input_ids"]


def completion_texts(tokenizer: PreTrainedTokenizerBase, completions: list[Messages]) -> list[str]:
    """The text each completion's ids encode, before the EOS that :func:`encode_completions` appends."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    return [completion_text(c) for c in completions]


def encode_completions(tokenizer: PreTrainedTokenizerBase, completions: list[Messages]) -> list[list[int]]:
    texts = completion_texts(tokenizer, completions)
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_right(sequences: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    """[N, W] long tensor of ``sequences`` padded on the right with ``value``; W rounds up to ``multiple``."""
    width = max(len(s) for s in sequences)
    width = -(-width // multiple) * multiple
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, ids in enumerate(sequences):
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def padded_batch(sequences: list[list[int]], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded ``sequences``."""
    return pad_right(sequences, pad_id, multiple), pad_right([[1] * len(s) for s in sequences], 0, multiple)


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id, EOS when the tokenizer has no pad token (positions past the mask are never read)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def truncate_pair(
    prompt_ids: list[int],
    completion_ids: list[int],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "keep_start",
) -> tuple[list[int], list[int]]:
    """The one truncation rule for (prompt, completion) ids, shared by token rewards and the policy trainer.

    1. A prompt longer than ``max_prompt_length`` keeps its last ``max_prompt_length`` tokens (the latest turn and
       the generation prompt survive).
    2. If prompt + completion is longer than ``max_length``, a ``max_length`` window of the joined sequence is kept,
       as TRL's ``truncation_mode``: ``keep_start`` keeps its start (the completion loses its tail), ``keep_end`` keeps
       its end (the prompt loses its head).

    The completion is therefore always a prefix of its untruncated ids. A window that would leave no prompt token
    (nothing to condition the first completion token on) or no completion token raises ``ValueError``.
    """
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    excess = len(prompt_ids) + len(completion_ids) - max_length if max_length is not None else 0
    if excess > 0:
        if truncation == "keep_start":
            completion_ids = completion_ids[: max(len(completion_ids) - excess, 0)]
        else:
            prompt_ids = prompt_ids[excess:]
    if not prompt_ids or not completion_ids:
        raise ValueError(
            f"max_length {max_length} ({truncation}) leaves {len(prompt_ids)} prompt and {len(completion_ids)} "
            "completion tokens; lower max_prompt_length or drop such rows with curate.rules.max_length"
        )
    return prompt_ids, completion_ids


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Messages,
    completion: Messages,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "keep_start",
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one example exactly as training sees them: encode, then :func:`truncate_pair`."""
    prompt_ids = encode_prompts(tokenizer, [prompt])[0]
    completion_ids = encode_completions(tokenizer, [completion])[0]
    return truncate_pair(prompt_ids, completion_ids, max_length, max_prompt_length, truncation)


def completion_offsets(tokenizer: PreTrainedTokenizerBase, completions: list[Messages]) -> list[list[tuple[int, int]]]:
    """Character span of every :func:`encode_completions` token inside ``completion_text``; EOS is ``(len, len)``.

    Spans let rewards move between tokenizers (ABC's reward model -> the policy) and render tokens as text. Tokens
    that split one character (byte-level BPE on emoji) share that character's span.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} has no offset mapping; token spans need a fast tokenizer")
    texts = [completion_text(c) for c in completions]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [[tuple(span) for span in spans] + [(len(text), len(text))] for text, spans in zip(texts, encoded)]
