"""Tokenization shared by every stage, so curation's length limits count exactly the tokens training will see.

Prompt ids come from the chat template with a generation prompt; completion ids are the completion text
without special tokens, followed by EOS. Later stages concatenate these id lists and never re-tokenize joined text.
"""

from __future__ import annotations

from functools import lru_cache

from creditflow.storage.hashing import sha256_json
from creditflow.tasks.schema import Messages, completion_text
from transformers import AutoTokenizer, PreTrainedTokenizerBase


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc


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


def encode_completions(tokenizer: PreTrainedTokenizerBase, completions: list[Messages]) -> list[list[int]]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    texts = [completion_text(c) for c in completions]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
