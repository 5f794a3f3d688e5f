"""Batched, seeded sampling from a causal LM: on-policy pairs, evaluation answers, and online RL rollouts.

Prompts are rendered with the chat template and a generation prompt (tokenization.render_prompts, as training
sees them), left-padded so every row continues from the right edge, and decoded without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from creditflow.tasks.configs import SamplingConfig
from creditflow.tasks.schema import Messages
from creditflow.tasks.tokenization import render_prompts
from creditflow.tasks.training import inference_dtype, resolve_device


def load_generation_model(folder: str | Path, device: str = "auto"):
    """(tokenizer, causal LM) for generation: bf16 on CUDA, fp32 on CPU, eval mode, a pad token set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=inference_dtype("auto", target))
    return tokenizer, model.to(target).eval()


@torch.no_grad()
def sample_responses(
    model, tokenizer, prompts: list[Messages], k: int, sampling: SamplingConfig, progress: bool = True
) -> list[list[str]]:
    """``k`` completions per prompt as text. Seeded: the same prompts, model and settings give the same samples.

    ``sampling.temperature == 0`` decodes greedily (then every one of the k answers is the same).
    """
    rollouts = sample_token_ids(model, tokenizer, prompts, k, sampling, progress)
    return [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in row.completions] for row in rollouts]


@dataclass
class Rollouts:
    """One prompt's token ids (chat-rendered, unpadded) and its ``k`` sampled completions, each cut after the first
    EOS (kept: the policy chose to stop) or at ``max_new_tokens``."""

    prompt_ids: list[int]
    completions: list[list[int]]


@torch.no_grad()
def sample_token_ids(
    model, tokenizer, prompts: list[Messages], k: int, sampling: SamplingConfig, progress: bool = True
) -> list[Rollouts]:
    """``k`` sampled completions per prompt, as token ids exactly as the model produced them (online RL scores and
    trains on these ids, never on a re-tokenization of their text)."""
    device = next(model.parameters()).device
    torch.manual_seed(sampling.seed)
    texts = render_prompts(tokenizer, prompts)
    decoding = (
        {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.temperature > 0
        else {"do_sample": False}
    )
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop] if stop is not None else []) | {tokenizer.eos_token_id}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    results: list[Rollouts] = []
    try:
        step = sampling.batch_size
        for start in tqdm(range(0, len(texts), step), desc="sampling", disable=not progress, leave=False):
            batch = tokenizer(texts[start : start + step], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(device)
            output = model.generate(
                **batch,
                **decoding,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=k,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            width = batch["input_ids"].shape[1]
            for row, ids in enumerate(batch["input_ids"].tolist()):
                prompt_ids = ids[width - int(batch["attention_mask"][row].sum()) :]
                completions = [_cut_at_stop(output[row * k + j, width:].tolist(), stop) for j in range(k)]
                results.append(Rollouts(prompt_ids, completions))
    finally:
        tokenizer.padding_side = side
    return results


def _cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop:
            return ids[: position + 1]
    return ids
