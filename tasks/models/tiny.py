"""Tiny tokenizers built locally (no hub), for tests and for the offline fallback when no real model is installed."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer(out_dir: str | Path, corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``corpus`` with a ChatML template; every byte is in the vocab, so any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        chat_template=CHATML_TEMPLATE,
        padding_side="right",
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides):
    """A ~100K-parameter Llama shape: fast enough for CPU tests, real enough to exercise every code path."""

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny_causal_lm(out_dir: str | Path, corpus: list[str], seed: int = 0, **overrides) -> Path:
    """Tokenizer + randomly initialized tiny Llama causal LM saved to ``out_dir`` (loads with AutoModelForCausalLM)."""

    tokenizer = build_tiny_tokenizer(out_dir, corpus)
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides)).save_pretrained(str(out_dir))
    return Path(out_dir)


def build_tiny_reward_backbone(out_dir: str | Path, corpus: list[str], seed: int = 0, **overrides) -> Path:
    """Tokenizer + tiny Llama sequence classifier (1 label) saved to ``out_dir``: a stand-in reward-model base."""

    tokenizer = build_tiny_tokenizer(out_dir, corpus)
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer, num_labels=1, **overrides)
    LlamaForSequenceClassification(config).save_pretrained(str(out_dir))
    return Path(out_dir)
