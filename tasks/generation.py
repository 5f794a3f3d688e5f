"""Batched, seeded sampling from a causal LM: on-policy pairs, evaluation answers, and online RL rollouts.

Prompts are rendered with the chat template and a generation prompt (tokenization.render_prompts, as training
sees them), left-padded so every row continues from the right edge, and decoded without special tokens.
"""

from __future__ import annotations

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
    """``k`` completions per prompt. Seeded: the same prompts, model and settings give the same samples.

    ``sampling.temperature == 0`` decodes greedily (then every one of the k answers is the same).
    """
    device = next(model.parameters()).device
    torch.manual_seed(sampling.seed)
    texts = render_prompts(tokenizer, prompts)
    decoding = (
        {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.temperature > 0
        else {"do_sample": False}
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    results: list[list[str]] = []
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
            )
            decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            results.extend([text.strip() for text in decoded[i : i + k]] for i in range(0, len(decoded), k))
    finally:
        tokenizer.padding_side = side
    return results
