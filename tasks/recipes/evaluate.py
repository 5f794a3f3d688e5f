"""Evaluation: did the trained policy beat the reference policy it started from?

Both policies answer the held-out prompts (the curated eval split, which on-policy sampling never touches) with the
same seeded sampling settings. Every answer is scored by the trained reward model and, when configured, by a gold
scorer: a plugin ``module:function`` taking ``(prompts, completions)`` and returning one float per completion;
``vader`` is built in (vaderSentiment's compound score, the sample task's ground truth), and, with
``evaluate.judge``, by a local chat model comparing each pair of answers in both orders (tasks/infer/judging.py).
Reported: win rate against the reference (ties count half) and its length-controlled form (AlpacaEval 2's GLM) per
judge, mean reward, mean gold score, mean length; the comparison across every evaluation in the workspace (e.g. DPO
vs DPO+T-REG) is drawn as a PNG.
"""

from __future__ import annotations

import datetime as dt
import math

import pyarrow as pa

from creditflow.storage.artifacts import ArtifactStore, Manifest
from creditflow.tasks.configs import EvaluateConfig, method_label
from creditflow.tasks.data import schema as S
from creditflow.tasks.infer.capabilities import run_lm_eval
from creditflow.tasks.infer.distributed import ray_session
from creditflow.tasks.infer.generation import generate
from creditflow.tasks.infer.gold import load_gold_scorer
from creditflow.tasks.infer.judging import PairwiseJudge, length_controlled_win_rate, outcomes
from creditflow.tasks.infer.reward_scoring import score_rewards
from creditflow.tasks.models.causal_lm import trained_model_folder
from creditflow.tasks.models.loading import load_generation_model
from creditflow.tasks.models.precision import resolve_device
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.stage import StageContext

# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_evaluate(ctx: StageContext) -> dict[str, float]:
    config: EvaluateConfig = ctx.config
    prompts = S.unique_prompts(S.split_rows(ctx.read_upstream("curate", "pairs"), "eval"), config.max_prompts)
    messages = prompts.column("prompt").to_pylist()
    if not messages:
        raise ValueError("evaluate: the curated pairs have no eval-split prompts (raise curate.eval_fraction)")

    trained = ["policy", *(["rl"] if "rl" in ctx.upstream else [])]  # the RL policy when that stage is enabled
    # The model the policies started from: the token-reward stage's reference (its log-probs trained the policy).
    reference = resolve_model(ctx.upstream["token_rewards"].config["reference_model"])
    reward_model = ctx.reward_model_folder()
    artifacts = [ctx.upstream_dir(name) for name in trained]
    judge = [resolve_model(config.judge)] if config.judge else []
    trust = ctx.remote_code_allowed(
        *artifacts, reference, reward_model, *judge
    )  # trained models keep their base's code
    systems = {name: trained_model_folder(folder, trust) for name, folder in zip(trained, artifacts)}
    systems["reference"] = reference
    gold = load_gold_scorer(config.gold_scorer) if config.gold_scorer else None
    completions: dict[str, list[str]] = {}
    with ray_session(ctx.compute):  # local, or one Ray session for every job
        for name, folder in systems.items():
            samples = generate(
                folder,
                messages,
                1,
                config,
                compute=ctx.compute,
                store=ctx.shard_results(name),
                progress=ctx.progress,
                trust_remote_code=trust,
            )
            completions[name] = [s[0] for s in samples]
        jobs = [(messages, [[{"role": "assistant", "content": t}] for t in texts]) for texts in completions.values()]
        scores = score_rewards(
            reward_model, jobs, ctx.compute, ctx.shard_results("rm"), ctx.progress, trust_remote_code=trust
        )
    rm_scores = dict(zip(completions, scores))
    gold_scores = {
        name: [float(x) for x in gold(messages, texts)] if gold else [None] * len(texts)
        for name, texts in completions.items()
    }
    judged = _judge(judge[0], config, messages, completions, trained, trust) if judge else {}

    rows = [
        {
            "prompt_id": prompt_id,
            "prompt": prompt[-1]["content"],
            "system": name,
            "completion": completions[name][i],
            "rm_score": rm_scores[name][i],
            "gold_score": gold_scores[name][i],
            "length": len(completions[name][i]),
            "judge": judged[name][i] if name in judged else None,  # 1 / 0.5 / 0 against the reference
        }
        for name in systems
        for i, (prompt_id, prompt) in enumerate(zip(prompts.column("prompt_id").to_pylist(), messages))
    ]
    ctx.writer.write_table("generations", pa.Table.from_pylist(rows))
    ctx.drop_shard_results()
    ctx.run.log_rows(rows[: 2 * 50], "evaluate/generations.json")

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics = {
        "prompts": len(messages),
        "rm_score.reference": mean(rm_scores["reference"]),
        "length.reference": mean([len(t) for t in completions["reference"]]),
    }
    if gold:
        metrics["gold_score.reference"] = mean(gold_scores["reference"])
    lengths = {name: [len(t) for t in texts] for name, texts in completions.items()}
    for name in trained:  # the DPO policy's win rates keep their unsuffixed names
        suffix = "" if name == "policy" else f".{name}"
        verdicts = {"rm": outcomes(rm_scores[name], rm_scores["reference"])}
        if gold:
            verdicts["gold"] = outcomes(gold_scores[name], gold_scores["reference"])
            metrics[f"gold_score.{name}"] = mean(gold_scores[name])
        if name in judged:
            verdicts["judge"] = judged[name]
        for judge, results in verdicts.items():
            metrics[f"win_rate_{judge}{suffix}"] = mean(results)
            lc = length_controlled_win_rate(results, lengths[name], lengths["reference"])
            metrics[f"lc_win_rate_{judge}{suffix}"] = lc
        metrics[f"rm_score.{name}"] = mean(rm_scores[name])
        metrics[f"length.{name}"] = mean(lengths[name])
    if config.lm_eval_tasks:
        metrics.update(_capabilities(config, systems, trained, trust))
    policy = ctx.upstream["policy"]
    if "final_token_reward_corr" in policy.metrics:
        metrics["token_reward_correlation"] = policy.metrics["final_token_reward_corr"]
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    current = _comparison_rows(policy, ctx.upstream.get("rl"), now, metrics)
    ctx.run.log_figure(comparison_figure([*comparison_rows(ctx.workspace.store), *current]), "evaluate/comparison.png")
    return metrics


def _capabilities(config: EvaluateConfig, systems: dict, trained: list[str], trust: bool) -> dict[str, float]:
    """lm-evaluation-harness scores of every system, ``lm_eval.<task>.<metric>.<system>``, and each policy's change
    from the reference, ``lm_eval.<task>.<metric>.change.<policy>`` (negative: capability lost)."""
    device = resolve_device()
    scores = {
        name: run_lm_eval(
            folder,
            config.lm_eval_tasks,
            config.lm_eval_include_path,
            device,
            config.lm_eval_batch_size,
            config.lm_eval_limit,
            trust,
        )
        for name, folder in systems.items()
    }
    out = {}
    for task, values in scores["reference"].items():
        for metric, reference in values.items():
            out[f"lm_eval.{task}.{metric}.reference"] = reference
            for name in trained:
                out[f"lm_eval.{task}.{metric}.{name}"] = scores[name][task][metric]
                out[f"lm_eval.{task}.{metric}.change.{name}"] = scores[name][task][metric] - reference
    return out


def _judge(folder, config: EvaluateConfig, messages, completions: dict[str, list[str]], trained, trust) -> dict:
    """Each trained policy's verdicts against the reference from ``evaluate.judge`` (1 / 0.5 / 0 per prompt)."""
    tokenizer, model = load_generation_model(folder, trust_remote_code=trust)
    judge = PairwiseJudge(model, tokenizer, batch_size=config.judge_batch_size)
    instructions = [m[-1]["content"] for m in messages]
    return {name: judge.compare(instructions, completions[name], completions["reference"]) for name in trained}


def comparison_rows(store: ArtifactStore) -> list[dict]:
    """Rows per evaluation in the store: the policy it evaluated (and the RL policy, if any), headline metrics."""
    by_digest = {stage: {m.digest: m for m in store.manifests(stage)} for stage in ("policy", "rl")}
    rows = []
    for m in store.manifests("evaluate"):
        upstream = m.inputs["upstream"]
        policy, rl = by_digest["policy"].get(upstream.get("policy", "")), by_digest["rl"].get(upstream.get("rl", ""))
        rows.extend(_comparison_rows(policy, rl if "rl" in upstream else None, m.created_at, m.metrics))
    return sorted(rows, key=lambda r: r["created_at"])


COMPARED = ("gold_score.policy", "gold_score.reference", "rm_score.policy", "win_rate_rm", "win_rate_gold")


def _comparison_rows(policy: Manifest | None, rl: Manifest | None, created_at: str, metrics: dict) -> list[dict]:
    rows = [
        {
            "method": method_label(policy.config) if policy else "?",
            "seed": policy.config.get("seed") if policy else None,
            "created_at": created_at,
            **{key: metrics.get(key) for key in COMPARED},
        }
    ]
    if "rm_score.rl" in metrics:
        rows.append(
            {
                "method": f"RL {rl.config['algorithm']} ({rl.config['reward_source']})" if rl else "RL",
                "seed": rl.config.get("seed") if rl else None,
                "created_at": created_at,
                "gold_score.policy": metrics.get("gold_score.rl"),
                "gold_score.reference": metrics.get("gold_score.reference"),
                "rm_score.policy": metrics.get("rm_score.rl"),
                "win_rate_rm": metrics.get("win_rate_rm.rl"),
                "win_rate_gold": metrics.get("win_rate_gold.rl"),
            }
        )
    return rows


def comparison_figure(rows: list[dict]):
    panels = [
        ("win_rate_rm", "win rate vs reference (RM)"),
        ("win_rate_gold", "win rate vs reference (gold)"),
        ("gold_score.policy", "mean gold score"),
    ]
    fig, axes = new_figure(len(panels), (4 * len(panels), 3.8))
    # method, seed and time (HH:MM, UTC): reruns of one method with other settings stay apart
    labels = [f"{r['method'].replace(' + ', chr(10) + '+ ')}\nseed {r['seed']}, {r['created_at'][11:16]}" for r in rows]
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.bar(range(len(rows)), values, color=["#4f81bd" if "T-REG" not in r["method"] else "#9bbb59" for r in rows])
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        if key.startswith("win_rate"):
            ax.axhline(0.5, color="black", lw=0.8, ls="--")
        else:  # each evaluation's own reference score, for the bar beside it
            reference = [r["gold_score.reference"] if r["gold_score.reference"] is not None else math.nan for r in rows]
            ax.scatter(range(len(rows)), reference, marker="_", s=600, color="black", label="reference", zorder=3)
            ax.legend(fontsize=7, loc="lower right")
    return finish(fig)
