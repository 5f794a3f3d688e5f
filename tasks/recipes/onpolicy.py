"""Optional stage: on-policy preference pairs (the SimPO v0.2 / T-REG data recipe).

For every curated prompt the reference policy samples k responses; the trained reward model scores them; the
best and worst become chosen and rejected, with the score margin. The output has the curated schema (and the
prompt keeps its train/eval split), so later stages consume it like any curated set. Prompts whose samples
cannot make a pair (all empty, all identical, no score spread above ``min_margin``) are quarantined with the
reason, as in curation.
"""

from __future__ import annotations

import json

import pyarrow as pa

from creditflow.tasks.configs import OnPolicyConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.infer.distributed import ray_session
from creditflow.tasks.infer.generation import generate
from creditflow.tasks.infer.reward_scoring import score_rewards
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.stage import StageContext

# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_onpolicy(ctx: StageContext) -> dict[str, float]:
    config: OnPolicyConfig = ctx.config
    # Train-split prompts only: the policy trains on train pairs, and eval prompts stay unseen for evaluation.
    prompts = S.unique_prompts(S.split_rows(ctx.read_upstream("curate", "pairs"), "train"), config.max_prompts)
    prompt_messages = prompts.column("prompt").to_pylist()
    k = config.samples_per_prompt
    reference, reward_model = resolve_model(ctx.reference_model), ctx.reward_model_folder()
    trust = ctx.remote_code_allowed(reference, reward_model)
    with ray_session(ctx.compute):  # local, or one Ray session for both jobs
        samples = generate(
            reference,
            prompt_messages,
            k,
            config,
            compute=ctx.compute,
            store=ctx.shard_results("samples"),
            progress=ctx.progress,
            trust_remote_code=trust,
        )
        flat_prompts = [p for p, texts in zip(prompt_messages, samples) for _ in texts]
        flat_completions = [[{"role": "assistant", "content": t}] for texts in samples for t in texts]
        [flat_scores] = score_rewards(
            reward_model,
            [(flat_prompts, flat_completions)],
            compute=ctx.compute,
            store=ctx.shard_results("rm"),
            progress=ctx.progress,
            trust_remote_code=trust,
        )
    scores = [flat_scores[i : i + k] for i in range(0, len(flat_scores), k)]

    pairs, quarantine = build_pairs(prompts, samples, scores, ctx.reference_model, config.min_margin)
    ctx.writer.write_table("pairs", S.rows_to_table(pairs, S.PAIRS_SCHEMA))
    ctx.writer.write_table("quarantine", S.rows_to_table(quarantine, S.QUARANTINE_SCHEMA))
    ctx.drop_shard_results()
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
