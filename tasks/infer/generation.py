"""Batched, seeded sampling from a causal LM: on-policy pairs, evaluation answers, and online RL rollouts.

Prompts are rendered with the chat template and a generation prompt (tokenization.render_prompts, as training
sees them), left-padded so every row continues from the right edge, and decoded without special tokens.

Seeding is per shard of ``PROMPTS_PER_SHARD`` prompts: shard i starts from ``shard_seed(seed, i)``, so a shard
samples the same tokens whichever process runs it, and :func:`generate` can spread shards over Ray actors
(tasks/infer/distributed.py) with results identical to one process. Shard 0 uses the seed itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from creditflow.tasks.config_base import ComputeConfig, SamplingConfig
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.infer.distributed import resumable_map, uses_ray
from creditflow.tasks.models.loading import load_generation_model, load_tokenizer
from creditflow.tasks.models.shared_prompts import prefill_prompts
from creditflow.tasks.models.tokenization import render_prompts

PROMPTS_PER_SHARD = 128  # the unit of seeding, of Ray scheduling and of resumption


def shard_seed(seed: int, shard: int) -> int:
    """The torch seed of shard ``shard``: the seed itself for shard 0, else a hash of (seed, shard), so shards of
    different seeds never share a stream."""
    if shard == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{shard}".encode()).digest()[:7], "little")


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[Messages],
    k: int,
    sampling: SamplingConfig,
    progress: bool = True,
    first_shard: int = 0,
    prompts_per_shard: int = PROMPTS_PER_SHARD,
) -> list[list[str]]:
    """``k`` completions per prompt as text. Seeded: the same prompts, model and settings give the same samples.

    ``sampling.temperature == 0`` decodes greedily (then every one of the k answers is the same).
    """
    rollouts = sample_token_ids(model, tokenizer, prompts, k, sampling, progress, first_shard, prompts_per_shard)
    return [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in row.completions] for row in rollouts]


class Sampler:
    """A generation model loaded once, in this process or in a Ray actor: (shard index, prompts) -> k texts each."""

    def __init__(self, folder: str, k: int, sampling: dict, progress: bool = False, trust_remote_code: bool = False):
        self.sampling, self.k, self.progress = SamplingConfig.model_validate(sampling), k, progress
        self.tokenizer, self.model = load_generation_model(folder, trust_remote_code=trust_remote_code)

    def __call__(self, shard: tuple[int, list[Messages]]) -> list[list[str]]:
        index, prompts = shard  # one whole shard: its seed is shard_seed(seed, index)
        args = (self.model, self.tokenizer, prompts, self.k, self.sampling, self.progress, index, len(prompts))
        return sample_responses(*args)


def generate(
    folder: str | Path,
    prompts: list[Messages],
    k: int,
    sampling: SamplingConfig,
    compute: ComputeConfig | None = None,
    store=None,
    progress: bool = True,
    prompts_per_shard: int = PROMPTS_PER_SHARD,
    trust_remote_code: bool = False,
) -> list[list[str]]:
    """:func:`sample_responses` from the model in ``folder``, shard by shard, here or on Ray actors (``compute``);
    finished shards go to ``store`` (storage.shard_results.ShardResults) so a rerun samples only the rest.
    ``trust_remote_code`` travels to every actor inside its build arguments."""
    starts = range(0, len(prompts), prompts_per_shard)
    shards = [(i, prompts[start : start + prompts_per_shard]) for i, start in enumerate(starts)]
    settings = sampling.model_dump(mode="json", include=set(SamplingConfig.model_fields))  # picklable, stage-free
    if sampling.backend == "vllm":
        build = partial(VllmSampler, str(folder), k, settings, trust_remote_code)
    else:
        local_bars = progress and not uses_ray(compute)  # batch bars, locally
        build = partial(Sampler, str(folder), k, settings, local_bars, trust_remote_code)
    done = resumable_map(shards, build, compute, store, f"sampling ({Path(folder).name})", progress)
    return [texts for shard in done for texts in shard]


@dataclass
class Rollouts:
    """One prompt's token ids (chat-rendered, unpadded) and its ``k`` sampled completions, each cut after the first
    EOS (kept: the policy chose to stop) or at ``max_new_tokens``."""

    prompt_ids: list[int]
    completions: list[list[int]]


@torch.no_grad()
def sample_token_ids(
    model,
    tokenizer,
    prompts: list[Messages],
    k: int,
    sampling: SamplingConfig,
    progress: bool = True,
    first_shard: int = 0,
    prompts_per_shard: int = PROMPTS_PER_SHARD,
) -> list[Rollouts]:
    """``k`` sampled completions per prompt, as token ids exactly as the model produced them (online RL scores and
    trains on these ids, never on a re-tokenization of their text). ``prompts[0]`` starts shard ``first_shard``."""
    results: list[Rollouts] = []
    for offset in range(0, len(prompts), prompts_per_shard):
        torch.manual_seed(shard_seed(sampling.seed, first_shard + offset // prompts_per_shard))
        shard = prompts[offset : offset + prompts_per_shard]
        results += _sample_shard(model, tokenizer, shard, k, sampling, progress)
    return results


def _sample_shard(model, tokenizer, prompts: list[Messages], k: int, sampling: SamplingConfig, progress: bool):
    device = next(model.parameters()).device
    texts = render_prompts(tokenizer, prompts)
    decoding = (
        {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}
        if sampling.temperature > 0
        else {"do_sample": False}
    )
    stop = stop_token_ids(model, tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    results: list[Rollouts] = []
    try:
        step = sampling.batch_size
        for start in tqdm(range(0, len(texts), step), desc="sampling", disable=not progress, leave=False):
            batch = tokenizer(texts[start : start + step], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(device)
            with _only_special_tokens(model):
                output = model.generate(
                    **_shared_prompts(model, batch, k),
                    **decoding,
                    max_new_tokens=sampling.max_new_tokens,
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


@contextmanager
def _only_special_tokens(model) -> Iterator[None]:
    """generate() fills every setting a call leaves out from the model's generation_config.json, and checkpoints
    ship sampling defaults there (a repetition penalty, min_new_tokens, ...). Those would change what is sampled
    past what the SamplingConfig says (and make RL rollouts come from another distribution than the policy's), so
    during the call the model keeps only its special token ids."""
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's transformers model
    saved = owner.generation_config
    owner.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
    )
    try:
        yield
    finally:
        owner.generation_config = saved


def _shared_prompts(model, batch, k: int) -> dict:
    """generate() inputs for k samples of each prompt in ``batch``: the prompts repeated k times, continuing from one
    pass over each (tasks/models/shared_prompts.py), not k. The samples are generate()'s own, token for token."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    inputs = {"input_ids": input_ids.repeat_interleave(k, 0), "attention_mask": attention_mask.repeat_interleave(k, 0)}
    if k > 1 and input_ids.shape[1] > 1:
        inputs["past_key_values"] = prefill_prompts(model, input_ids, attention_mask, k)
    return inputs


def stop_token_ids(model, tokenizer) -> set[int]:
    """The tokens that end a completion: the generation config's EOS ids and the tokenizer's."""
    stop = model.generation_config.eos_token_id
    return set(stop if isinstance(stop, list) else [stop] if stop is not None else []) | {tokenizer.eos_token_id}


def _cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop:
            return ids[: position + 1]
    return ids


# ---------------------------------------------------------------------------------------------------------
# vLLM (``backend: vllm``): the same shards, prompts and settings, sampled by a vLLM engine on a GPU worker.


def vllm_sampling_args(sampling: SamplingConfig, k: int, shard: int, position: int) -> dict:
    """``vllm.SamplingParams`` arguments for prompt ``position`` of shard ``shard``: the same knobs as generate()
    (greedy at T = 0; top_k 0 is vLLM's -1), and a per-request seed derived from the shard's, so a shard samples
    the same tokens on whichever worker runs it. vLLM's sampler is not transformers', so the texts differ from the
    hf backend's: the backend is part of the cache key."""
    greedy = sampling.temperature == 0
    return {
        "n": k,
        "temperature": sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": -1 if greedy or sampling.top_k == 0 else sampling.top_k,
        "max_tokens": sampling.max_new_tokens,
        "seed": (shard_seed(sampling.seed, shard) + position) % 2**63,
        "skip_special_tokens": True,
    }


class VllmSampler:
    """A vLLM engine for the model in ``folder``: (shard index, prompts) -> k texts each, like :class:`Sampler`."""

    def __init__(self, folder: str, k: int, sampling: dict, trust_remote_code: bool = False):
        from vllm import LLM  # pyright: ignore[reportMissingImports]  (the optional GPU extra, deferred)

        self.sampling, self.k = SamplingConfig.model_validate(sampling), k
        self.tokenizer = load_tokenizer(folder, trust_remote_code)
        self.engine = LLM(
            model=folder, tokenizer=folder, dtype="auto", seed=self.sampling.seed, trust_remote_code=trust_remote_code
        )

    def __call__(self, shard: tuple[int, list[Messages]]) -> list[list[str]]:
        from vllm import SamplingParams  # pyright: ignore[reportMissingImports]

        index, prompts = shard
        # The ids the hf backend feeds generate(): chat-rendered text, tokenized without extra special tokens.
        ids = self.tokenizer(render_prompts(self.tokenizer, prompts), add_special_tokens=False)["input_ids"]
        params = [SamplingParams(**vllm_sampling_args(self.sampling, self.k, index, j)) for j in range(len(ids))]
        outputs = self.engine.generate([{"prompt_token_ids": row} for row in ids], params, use_tqdm=False)
        return [[choice.text.strip() for choice in output.outputs] for output in outputs]
