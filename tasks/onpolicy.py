"""Optional stage: on-policy preference pairs (the SimPO v0.2 / T-REG data recipe).

For every curated prompt the reference policy samples k responses; the trained reward model scores them; the
best and worst become chosen and rejected, with the score margin. The output has the curated schema (and the
prompt keeps its train/eval split), so later stages consume it like any curated set. Prompts whose samples
cannot make a pair (all empty, all identical, no score spread above ``min_margin``) are quarantined with the
reason, as in curation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from creditflow.tasks import schema as S
from creditflow.tasks.reward_model import RewardScorer
from creditflow.tasks.stage import StageContext
from creditflow.tasks.tokenization import render_prompts


@dataclass
class OnPolicyConfig:
    enabled: bool = False
    policy: str = "smollm2"  # the reference policy: a local folder or a named model (tasks/models.py)
    samples_per_prompt: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    batch_size: int = 8  # prompts per generate() call (each expands to samples_per_prompt sequences)
    max_prompts: int | None = None  # first N train-split prompts (in curated order)
    min_margin: float = 0.0  # best - worst reward must exceed this
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ValueError("onpolicy.samples_per_prompt must be >= 2 to form a pair")


def policy_folder(spec: str) -> Path:
    from creditflow.tasks.models import resolve_model

    return resolve_model(spec)


def load_policy(folder: str | Path):
    """(tokenizer, causal LM) for generation: bf16 on CUDA, fp32 on CPU, eval mode, a pad token set."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return tokenizer, AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[S.Messages],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[list[str]]:
    """k sampled completions per prompt, decoded without special tokens. Seeded: same arguments, same samples."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    texts = render_prompts(tokenizer, prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    results: list[list[str]] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="sampling", disable=not progress, leave=False):
            batch = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            output = model.generate(
                **batch,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                num_return_sequences=k,
                pad_token_id=tokenizer.pad_token_id,
            )
            decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            results.extend([text.strip() for text in decoded[i : i + k]] for i in range(0, len(decoded), k))
    finally:
        tokenizer.padding_side = side
    return results


def build_pairs(
    prompts: pa.Table, samples: list[list[str]], scores: list[list[float]], policy: str, min_margin: float
) -> tuple[list[dict], list[dict]]:
    """Best vs worst sample per prompt -> (pairs, quarantine rows)."""
    pairs, quarantine = [], []
    for row, texts, rewards in zip(prompts.to_pylist(), samples, scores):
        candidates = [(r, t) for r, t in zip(rewards, texts) if t]
        problem = None
        if len(candidates) < 2:
            problem = ("empty", f"{len(texts) - len(candidates)} of {len(texts)} samples are empty")
        elif len({t for _, t in candidates}) < 2:
            problem = ("identical", "all non-empty samples are identical")
        else:
            best, worst = max(candidates), min(candidates)
            if best[0] - worst[0] <= min_margin:
                problem = ("margin", f"reward spread {best[0] - worst[0]:.4g} <= min_margin {min_margin}")
        if problem:
            quarantine.append(
                {
                    "source": f"onpolicy:{policy}",
                    "source_row": f"prompt {row['prompt_id']}",
                    "rule": problem[0],
                    "field": "samples",
                    "reason": problem[1],
                    "pair_id": None,
                    "raw": json.dumps([{"text": t, "reward": r} for t, r in zip(texts, rewards)], ensure_ascii=False),
                }
            )
            continue
        chosen = [{"role": "assistant", "content": best[1]}]
        rejected = [{"role": "assistant", "content": worst[1]}]
        pairs.append(
            {
                "pair_id": S.pair_id(row["prompt"], chosen, rejected),
                "prompt_id": row["prompt_id"],
                "prompt": row["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": best[0],
                "score_rejected": worst[0],
                "margin": best[0] - worst[0],
                "prompt_tokens": None,
                "chosen_tokens": None,
                "rejected_tokens": None,
                "source": f"onpolicy:{policy}",
                "source_row": f"prompt {row['prompt_id']}",
                "split": row["split"],
            }
        )
    return pairs, quarantine


def unique_prompts(pairs: pa.Table, limit: int | None) -> pa.Table:
    """One row per prompt id (first occurrence), keeping prompt messages and split."""
    seen: set[str] = set()
    keep = []
    for index, prompt_id in enumerate(pairs.column("prompt_id").to_pylist()):
        if prompt_id not in seen:
            seen.add(prompt_id)
            keep.append(index)
    table = pairs.select(["prompt_id", "prompt", "split"]).take(keep)
    return table.slice(0, limit) if limit is not None else table


def compute_onpolicy(ctx: StageContext) -> dict[str, float]:
    config: OnPolicyConfig = ctx.config
    # Train-split prompts only: the policy trains on train pairs, and eval prompts stay unseen for evaluation.
    prompts = unique_prompts(S.split_rows(ctx.read_upstream("curate", "pairs"), "train"), config.max_prompts)
    tokenizer, model = load_policy(policy_folder(config.policy))
    prompt_messages = prompts.column("prompt").to_pylist()
    samples = sample_responses(
        model,
        tokenizer,
        prompt_messages,
        k=config.samples_per_prompt,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        seed=config.seed,
        progress=ctx.progress,
    )
    del model

    scorer = RewardScorer(ctx.upstream_dir("reward_model") / "model")
    flat_prompts = [p for p, texts in zip(prompt_messages, samples) for _ in texts]
    flat_completions = [[{"role": "assistant", "content": t}] for texts in samples for t in texts]
    flat_scores = scorer.score(flat_prompts, flat_completions)
    k = config.samples_per_prompt
    scores = [flat_scores[i : i + k] for i in range(0, len(flat_scores), k)]

    pairs, quarantine = build_pairs(prompts, samples, scores, config.policy, config.min_margin)
    ctx.writer.write_table("pairs", S.rows_to_table(pairs, S.PAIRS_SCHEMA))
    ctx.writer.write_table("quarantine", S.rows_to_table(quarantine, S.QUARANTINE_SCHEMA))
    if pairs:
        ctx.run.log_rows(
            [
                {
                    "prompt": p["prompt"][-1]["content"],
                    "chosen": p["chosen"][0]["content"],
                    "rejected": p["rejected"][0]["content"],
                    "margin": p["margin"],
                }
                for p in pairs[:50]
            ],
            "onpolicy/sample_pairs.json",
        )
    margins = [p["margin"] for p in pairs]
    return {
        "prompts": prompts.num_rows,
        "samples": sum(len(s) for s in samples),
        "pairs_out": len(pairs),
        "quarantined": len(quarantine),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
        "empty_samples": sum(1 for texts in samples for t in texts if not t),
    }
