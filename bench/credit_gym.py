"""Benchmark: the credit gym. Where does token-level credit help preference optimization, and what does a wrong
token reward cost, on tasks whose every token's truth is known (tasks/credit/gym.py)?

For each task and seed ("a world"): a tiny Llama (2 layers, hidden 64) is built from scratch and SFT-trained on the
three prompt kinds; it samples k = 8 answers for each of the train prompts and of a disjoint split, pairs are drawn
from them (random pairs, or best vs worst of 8) and labelled by their true error counts. Every method then trains
from that same SFT model on the same pairs, with the same batch order and steps (the seed's), and is measured on
held-out prompts:

    exact     the probability of the exactly right answer, teacher-forced (no sampling noise)
    errors    the share of wrong decisions in one answer sampled at temperature 1 per prompt

Methods: DPO; DPO + T-REG with each token-reward source (alpha = --alpha); DPO + NLL on the chosen tokens (RPO's
rpo_alpha = --alpha / 2: the no-label control); SimPO with and without T-REG and NLL; alpha and learning-rate sweeps;
best-vs-worst pairs; online RL (GRPO, RLOO, PPO) on the exact-match reward, sparse or with dense token credit
(the oracle and its random-sign and inverted controls through ``rl.credit_function``, the DPO-implicit reward,
the contrastive control instructions, and ABC on the gym's reward model against that reward model's sparse score).
Sources: the oracle (dense: every token; sparse: only where the two answers differ), its controls (random
signs, inverted, a constant +s/-s), contrastive prompting (the gym's control instructions and every T-REG preset),
ABC from a reward model trained on the pairs, and the DPO-implicit reward of a DPO policy trained on the disjoint
split. Each source also gets the audit's paired within-slot score on held-out items (right vs one-slip answers).

Comparisons are paired by seed: mean difference ± standard error over seeds. The results (JSON), a table and the
figure (gain over DPO vs audit score; error-rate curves) go to --out and to the MLflow experiment "credit-gym".

    .venv/bin/python bench/credit_gym.py [--seeds 0 1 2 3 4] [--tasks walk shift] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from creditflow.flows.env import apply_defaults

apply_defaults()

import torch  # noqa: E402  (after apply_defaults: thread settings)

from creditflow.storage.tracking import Run  # noqa: E402
from creditflow.storage.workspace import Workspace  # noqa: E402
from creditflow.tasks.configs import PolicyConfig, RewardModelConfig, RLConfig  # noqa: E402
from creditflow.tasks.credit import gym  # noqa: E402
from creditflow.tasks.credit.rl_rewards import assistant  # noqa: E402
from creditflow.tasks.models.loading import load_reference_model, load_tokenizer  # noqa: E402
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone  # noqa: E402
from creditflow.tasks.plots import finish  # noqa: E402
from creditflow.tasks.recipes.policy import PolicyTrainer  # noqa: E402
from creditflow.tasks.recipes.reward_model import PairData, RewardModelTrainer  # noqa: E402
from creditflow.tasks.recipes.rl import RLTrainer  # noqa: E402

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Method:
    name: str
    loss: str = "dpo"
    source: str | None = None  # the T-REG token rewards
    alpha: float = 0.0
    rpo_alpha: float = 0.0
    lr_scale: float = 1.0
    pairs: str = "random"
    curve: bool = False  # evaluate every --eval-every steps (learning curves)


def offline_methods(sources: list[str], alpha: float, alphas: list[float], lr_scales: list[float]) -> list[Method]:
    nll = alpha / 2
    out = [Method("dpo", curve=True), Method("dpo+nll", rpo_alpha=nll, curve=True)]
    out += [Method(f"dpo+treg:{s}", source=s, alpha=alpha, curve=s in CURVES) for s in sources]
    out += [
        Method("simpo", loss="simpo"),
        Method("simpo+nll", loss="simpo", rpo_alpha=nll),
        Method("simpo+treg:oracle_dense", loss="simpo", source="oracle_dense", alpha=alpha),
        Method("simpo+treg:contrastive:control", loss="simpo", source="contrastive:control", alpha=alpha),
    ]
    for a in alphas:  # the alpha sweep (alpha itself is in the main rows)
        if a != alpha:
            out += [Method(f"dpo+treg:{s}@a={a:g}", source=s, alpha=a) for s in SWEPT]
            out.append(Method(f"dpo+nll@a={a / 2:g}", rpo_alpha=a / 2))
    out += [Method(f"dpo@lr x{s:g}", lr_scale=s) for s in lr_scales if s != 1.0]
    for name in ("dpo", "dpo+nll", "dpo+treg:oracle_dense", "dpo+treg:contrastive:control"):
        base = next(m for m in out if m.name == name)
        out.append(Method(name + BVW, base.loss, base.source, base.alpha, base.rpo_alpha, pairs="bvw"))
    return out


BVW = " [best-vs-worst]"
CURVES = ("oracle_dense", "inverted", "contrastive:control", "dpo_implicit")
SWEPT = ("oracle_dense", "inverted", "contrastive:control")

RL_ALGORITHMS = ("grpo", "rloo", "rloo_token", "ppo")
RL_CREDIT_WEIGHT = 0.25  # GRPO's weight on the group-normalized credit: at 1 the DPO-implicit credit collapsed it


@dataclass(frozen=True)
class RLRun:
    algorithm: str
    # sparse, rm_sparse, dpo_implicit, contrastive:control, abc, or a gym credit function's source (oracle_dense,
    # random_signs, inverted)
    source: str
    credit_weight: float = RL_CREDIT_WEIGHT

    @property
    def name(self) -> str:
        return f"{self.algorithm} {self.source}"


RL_CREDIT_FUNCTIONS = {  # gym source -> its rl.credit_function
    "oracle_dense": "creditflow.tasks.credit.gym:oracle_credit",
    "random_signs": "creditflow.tasks.credit.gym:random_sign_credit",
    "inverted": "creditflow.tasks.credit.gym:inverted_credit",
}
# The reward model's runs (ABC's own setting): r = exact match + RM_WEIGHT x the gym's reward model's score, on the
# last token (rm_sparse) or with ABC's attention credit (abc), so abc's baseline is rm_sparse, not sparse.
RM_WEIGHT = 1.0
RL_BASELINE_SOURCE = {"abc": "rm_sparse"}  # a dense source -> its sparse run's source (default: sparse)
RL_RUNS = [
    *(RLRun("grpo", s) for s in ("sparse", *RL_CREDIT_FUNCTIONS, "dpo_implicit", "contrastive:control")),
    RLRun("grpo", "rm_sparse"),
    RLRun("grpo", "abc"),
    *(RLRun(algorithm, source) for algorithm in ("rloo_token", "ppo") for source in ("oracle_dense", "dpo_implicit")),
    RLRun("rloo", "sparse"),
    RLRun("ppo", "sparse"),
]


def rl_baseline(method: str) -> str:
    """The sparse run a dense RL run is compared with (rloo_token's is sequence-level RLOO, TRL's; ABC's is the same
    reward model's score on the last token)."""
    algorithm, source = method.split(" ")
    return f"{'rloo' if algorithm == 'rloo_token' else algorithm} {RL_BASELINE_SOURCE.get(source, 'sparse')}"


def is_sparse_rl(method: str) -> bool:
    return method.split(" ")[0] in RL_ALGORITHMS and method.split(" ")[1] in ("sparse", "rm_sparse")


# ---------------------------------------------------------------------------------------------------------
# One world: a task and a seed


def run_world(task_name: str, seed: int, args, folder: Path) -> dict:
    started = time.perf_counter()
    task = gym.TASKS[task_name]
    sft_examples = gym.corrupted_dataset(task, args.sft_problems, gym.seeded(seed, 1))
    sft_dir = folder / "sft"
    corpus = [text for turn, answer in sft_examples for text in (turn[0]["content"], answer)]
    tokenizer_corpus = corpus + [gym.CONTROLS["better"], gym.CONTROLS["worse"]]
    build_tiny_causal_lm(sft_dir, tokenizer_corpus, seed=seed)
    tokenizer = load_tokenizer(str(sft_dir))
    sft_loss = gym.train_sft(sft_dir, sft_examples, args.sft_steps, seed)
    reference = load_reference_model(sft_dir, CPU, torch.float32)

    prompts = _distinct_prompts(task, seed, 2 * args.pairs + args.eval_prompts + args.audit_items)
    train, implicit_split = prompts[: args.pairs], prompts[args.pairs : 2 * args.pairs]
    held_out = prompts[2 * args.pairs : 2 * args.pairs + args.eval_prompts]
    audit_prompts = prompts[2 * args.pairs + args.eval_prompts :]
    groups = gym.sample_responses(reference, tokenizer, train + implicit_split, args.k, seed)
    gym.with_reference_logprobs(reference, tokenizer, [r for group in groups for r in group])
    pairs = {
        "random": gym.build_pairs(groups[: args.pairs], "random", gym.seeded(seed, 2)),
        "bvw": gym.build_pairs(groups[: args.pairs], "best_vs_worst", gym.seeded(seed, 2)),
    }
    implicit_pairs = gym.build_pairs(groups[args.pairs :], "random", gym.seeded(seed, 3))

    config = _policy_config(args, seed, Method("dpo"))
    _train_policy(sft_dir, implicit_pairs, None, config, folder / "dpo_implicit")
    reward_model_dir = _train_reward_model(tokenizer_corpus, pairs["random"], implicit_pairs, seed, folder)
    sources = {
        "oracle_dense": gym.oracle_dense,
        "oracle_sparse": gym.oracle_sparse,
        "random_signs": gym.random_signs(seed),
        "inverted": gym.inverted_oracle,
        "constant": gym.constant,
        **gym.contrastive_sources(reference, tokenizer),
        "abc": gym.abc_source(reward_model_dir),
        "dpo_implicit": gym.dpo_implicit(
            load_reference_model(folder / "dpo_implicit", CPU, torch.float32), reference, tokenizer
        ),
    }
    audit_rng = gym.seeded(seed, 4)
    items = []
    for prompt in audit_prompts:
        right, wrong, slot = gym.slip(prompt, audit_rng)
        items.append((gym.given_response(tokenizer, prompt, right), gym.given_response(tokenizer, prompt, wrong), slot))
    audit = {name: gym.audit_score(source, items) for name, source in sources.items()}

    evaluate = Evaluator(tokenizer, held_out, seed)
    results = {"sft": evaluate(reference)}
    rewards: dict[tuple[str, str], gym.Rewards] = {}
    methods = offline_methods(list(sources), args.alpha, args.alphas, args.lr_scales)
    for method in methods:
        chosen_pairs = pairs[method.pairs]
        if method.source and (method.source, method.pairs) not in rewards:
            rewards[method.source, method.pairs] = sources[method.source](chosen_pairs)
        token_rewards = rewards[method.source, method.pairs] if method.source else None
        evaluate.curve = []
        trainer = _train_policy(
            sft_dir,
            chosen_pairs,
            token_rewards,
            _policy_config(args, seed, method),
            None,
            evaluate if method.curve else None,
        )
        results[method.name] = {**evaluate(trainer.lm), "curve": evaluate.curve}
    if args.rl:
        for run in RL_RUNS:
            trainer = _train_rl(args, seed, sft_dir, reward_model_dir, folder, train, run)
            results[run.name] = {**evaluate(trainer.lm), "curve": []}
    stats = {
        "pairs": len(pairs["random"]),
        "pairs_bvw": len(pairs["bvw"]),
        "chosen_errors": float(np.mean([w.errors for w, _ in pairs["random"]])),
        "rejected_errors": float(np.mean([l_.errors for _, l_ in pairs["random"]])),
        "sft_final_loss": float(np.mean(sft_loss[-10:])),
        "seconds": time.perf_counter() - started,
    }
    return {"task": task_name, "seed": seed, "audit": audit, "results": results, "stats": stats}


def _distinct_prompts(task, seed: int, n: int) -> list[str]:
    rng, seen = gym.seeded(seed, 5), {}
    for _ in range(100 * n):
        seen.setdefault(task.sample(rng), None)
        if len(seen) == n:
            return list(seen)
    raise ValueError(f"{task.name}: fewer than {n} distinct prompts")


def _policy_config(args, seed: int, method: Method) -> PolicyConfig:
    return PolicyConfig.model_validate(
        {
            "learning_rate": args.lr * method.lr_scale,
            "loss": {"loss_type": method.loss, "beta": 0.1, "alpha": method.alpha, "rpo_alpha": method.rpo_alpha},
            "token_reward_source": "contrastive" if method.source else "none",
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "warmup_ratio": 0.0,
            "max_grad_norm": None,  # clipping would break the constant source's exact equivalence with DPO
            "length_grouped": False,
            "save_every": 10**6,
            "seed": seed,
        }
    )


def _train_policy(sft_dir, pairs, rewards, config, out_dir=None, evaluate=None) -> PolicyTrainer:
    trainer = PolicyTrainer(sft_dir, gym.policy_examples(pairs, rewards), config, progress=False)
    if evaluate is not None:
        evaluate.start_curve(trainer)
    trainer.train()
    trainer.lm.eval()
    if out_dir is not None:
        trainer.lm.save_pretrained(out_dir)
        load_tokenizer(str(sft_dir)).save_pretrained(str(out_dir))
    return trainer


def _train_reward_model(corpus, pairs, eval_pairs, seed: int, folder: Path) -> Path:
    def data(chosen_pairs):
        prompts = [gym.messages(w.prompt) for w, _ in chosen_pairs]
        return PairData(
            prompts,
            [assistant(w.text) for w, _ in chosen_pairs],
            [assistant(l_.text) for _, l_ in chosen_pairs],
            [0.0] * len(chosen_pairs),
        )

    base = build_tiny_reward_backbone(folder / "rm_base", corpus, seed=seed)
    config = RewardModelConfig(base_model=str(base), epochs=4, learning_rate=3e-3, batch_size=16, seed=seed)
    trainer = RewardModelTrainer(base, data(pairs), data(eval_pairs), config, progress=False)
    trainer.train()
    trainer.save_pretrained(folder / "rm")
    return folder / "rm"


def _train_rl(args, seed, sft_dir, reward_model_dir, folder, train, run: RLRun) -> RLTrainer:
    function = RL_CREDIT_FUNCTIONS.get(run.source)
    source = {"rm_sparse": "sparse", "contrastive:control": "contrastive"}.get(run.source, run.source)
    control = (  # the instructions the SFT model was trained under, as the offline contrastive:control source
        {
            "contrastive_template": "custom",
            "contrastive_better_template": gym.CONTROLS["better"],
            "contrastive_worse_template": gym.CONTROLS["worse"],
        }
        if run.source == "contrastive:control"
        else {}
    )
    config = RLConfig.model_validate(
        {
            "algorithm": run.algorithm,
            "reward_source": "function" if function else source,
            "credit_function": function,
            "credit_weight": run.credit_weight,
            "reward_model_weight": RM_WEIGHT if run.source in ("rm_sparse", "abc") else 0.0,
            **control,
            "reward_functions": ["creditflow.tasks.credit.gym:exact_match_reward"],
            "samples_per_prompt": 4,
            "batch_size": 16,
            "max_steps": args.rl_iterations,
            "epochs": 100,
            "learning_rate": args.rl_lr,
            "kl_coef": 0.05,
            "seed": seed,
            "gold_scorer": None,
            "sampling": {"max_new_tokens": 16, "batch_size": 64, "seed": seed},
        }
    )
    implicit = (
        {"implicit_model_dir": folder / "dpo_implicit", "implicit_beta": 0.1} if run.source == "dpo_implicit" else {}
    )
    prompts = [gym.messages(p) for p in train]
    trainer = RLTrainer(sft_dir, reward_model_dir, prompts, config, progress=False, **implicit)
    trainer.train()
    trainer.lm.eval()
    return trainer


class Evaluator:
    """The held-out metrics of a model, and the learning curve of a trainer (every ``eval_every`` steps)."""

    def __init__(self, tokenizer, prompts: list[str], seed: int, eval_every: int = 5):
        self.tokenizer, self.prompts, self.seed, self.eval_every = tokenizer, prompts, seed, eval_every
        self.curve: list[dict] = []

    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        out = {
            "exact": gym.exact_answer_prob(model, self.tokenizer, self.prompts),
            "errors": gym.sampled_error_rate(model, self.tokenizer, self.prompts, 10_000 + self.seed),
        }
        model.train(was_training)
        return out

    def start_curve(self, trainer: PolicyTrainer) -> None:
        self.curve = [{"step": 0, **self(trainer.lm)}]

        def on_step(step: int, metrics: dict) -> None:
            if step % self.eval_every == 0:
                self.curve.append({"step": step, **self(trainer.lm)})

        trainer.on_step = on_step


# ---------------------------------------------------------------------------------------------------------
# Paired statistics, the table and the figure


def paired(worlds: list[dict], task: str, method: str, baseline: str, metric: str) -> tuple[float, float, int]:
    """Mean difference method - baseline over the task's seeds, its standard error, and the seed count."""
    diffs = [
        w["results"][method][metric] - w["results"][baseline][metric]
        for w in worlds
        if w["task"] == task and method in w["results"] and baseline in w["results"]
    ]
    if not diffs:
        return float("nan"), float("nan"), 0
    se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
    return float(np.mean(diffs)), se, len(diffs)


def steps_to_target(worlds: list[dict]) -> dict[str, list[int]]:
    """For each method with a learning curve, the first evaluated step whose sampled error rate is at or below
    DPO's final one in the same world (the seeds where it gets there)."""
    out: dict[str, list[int]] = {}
    for world in worlds:
        target = world["results"]["dpo"]["errors"]
        for method, row in world["results"].items():
            if row.get("curve"):
                hits = [p["step"] for p in row["curve"] if p["errors"] <= target]
                out.setdefault(method, [])
                if hits:
                    out[method].append(hits[0])
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731  (no ties in practice)
    rx, ry = rank(np.asarray(x)), rank(np.asarray(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 2 else float("nan")


def summarize(worlds: list[dict], tasks: list[str]) -> tuple[str, dict]:
    lines, summary = [], {}
    for task in tasks:
        mine = [w for w in worlds if w["task"] == task]
        seeds = len(mine)
        methods = list(mine[0]["results"])
        lines += [
            f"\n### {task} ({seeds} seeds; mean ± SE; Δ paired by seed)\n",
            "| method | exact | Δ exact vs DPO | Δ exact vs DPO+NLL | errors | Δ errors vs DPO | audit (paired) |",
            "|---|---|---|---|---|---|---|",
        ]
        summary[task] = {}
        for method in methods:
            values = [w["results"][method] for w in mine]
            exact, errors = [v["exact"] for v in values], [v["errors"] for v in values]
            # best-vs-worst rows are compared with DPO and the NLL control on the same pairs
            suffix = BVW if method.endswith(BVW) else ""
            d_dpo, se_dpo, _ = paired(mine, task, method, "dpo" + suffix, "exact")
            d_nll, se_nll, _ = paired(mine, task, method, "dpo+nll" + suffix, "exact")
            d_err, se_err, _ = paired(mine, task, method, "dpo" + suffix, "errors")
            source = method.split("treg:")[1].split("@")[0].split(" ")[0] if "treg:" in method else None
            if method.split(" ")[0] in RL_ALGORITHMS and method.split(" ")[1] in mine[0]["audit"]:
                source = method.split(" ")[1]
            audit = float(np.mean([w["audit"][source] for w in mine])) if source else None
            summary[task][method] = {
                "exact": float(np.mean(exact)),
                "exact_se": _se(exact),
                "errors": float(np.mean(errors)),
                "delta_exact_vs_dpo": (d_dpo, se_dpo),
                "delta_exact_vs_nll": (d_nll, se_nll),
                "delta_errors_vs_dpo": (d_err, se_err),
                "audit": audit,
            }
            vs_dpo = method not in ("dpo", "sft", "dpo" + BVW)
            lines.append(
                f"| {method} | {np.mean(exact):.3f} ± {_se(exact):.3f} | {_cell(d_dpo, se_dpo, vs_dpo)} | "
                f"{_cell(d_nll, se_nll, vs_dpo and not method.startswith('dpo+nll'))} | {np.mean(errors):.3f} | "
                f"{_cell(d_err, se_err, vs_dpo)} | {'' if audit is None else f'{audit:.2f}'} |"
            )
        main = [m for m in methods if m.startswith("dpo+treg:") and "@" not in m and "[" not in m]
        audits = [summary[task][m]["audit"] for m in main]
        gains = [summary[task][m]["delta_exact_vs_dpo"][0] for m in main]
        rho = spearman(audits, gains)
        summary[task]["spearman_audit_vs_gain"] = rho
        lines.append(f"\nRank correlation (Spearman) of audit score and gain over DPO, {len(main)} sources: {rho:+.2f}")
        reached = steps_to_target(mine)
        summary[task]["steps_to_dpo_final_errors"] = reached
        cells = [f"{m} {np.mean(s):.0f} ({len(s)}/{seeds})" if s else f"{m} never" for m, s in reached.items()]
        lines.append("Steps to reach DPO's final error rate (mean over the seeds that reach it): " + "; ".join(cells))
        dense_rl = [m for m in methods if m.split(" ")[0] in RL_ALGORITHMS and not is_sparse_rl(m)]
        for method in dense_rl:
            d, se, _ = paired(mine, task, method, rl_baseline(method), "exact")
            summary[task][method]["delta_exact_vs_sparse_rl"] = (d, se)
            lines.append(f"RL: {method} vs {rl_baseline(method)}: Δ exact {d:+.3f} ± {se:.3f}")
        grpo = [m for m in dense_rl if m.startswith("grpo ")]
        if grpo:
            rl_audits = [float(np.mean([w["audit"][m.split(" ")[1]] for w in mine])) for m in grpo]
            rl_gains = [summary[task][m]["delta_exact_vs_sparse_rl"][0] for m in grpo]
            rho_rl = spearman(rl_audits, rl_gains)
            summary[task]["spearman_audit_vs_rl_gain"] = rho_rl
            lines.append(
                f"Rank correlation (Spearman) of audit score and GRPO's gain over sparse GRPO, {len(grpo)} sources: "
                f"{rho_rl:+.2f}"
            )
    return "\n".join(lines), summary


def _cell(difference: float, se: float, shown: bool) -> str:
    return f"{difference:+.3f} ± {se:.3f}" if shown and not np.isnan(difference) else "-"


def _se(values: list[float]) -> float:
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def figure(worlds: list[dict], summary: dict, tasks: list[str]):
    matplotlib.use("Agg")
    fig, grid = plt.subplots(len(tasks), 3, figsize=(19, 4.6 * len(tasks)), squeeze=False)
    for (left, middle, right), task in zip(grid, tasks):
        points = {
            method.removeprefix("dpo+treg:"): (row["audit"], *row["delta_exact_vs_dpo"])
            for method, row in summary[task].items()
            if method.startswith("dpo+treg:") and "@" not in method and "[" not in method
        }
        # The inverted oracle's loss dwarfs every other gain: it is drawn at the bottom edge, its value written.
        floor = min(d - np.nan_to_num(se) for name, (_, d, se) in points.items() if name != "inverted") - 0.02
        for i, (name, (audit, d, se)) in enumerate(sorted(points.items(), key=lambda p: p[1][1])):
            shown = max(d, floor)
            left.errorbar(audit, shown, yerr=se if d > floor else None, fmt="o" if d > floor else "v", capsize=3)
            label = name if d > floor else f"{name} ({d:+.2f})"
            left.annotate(label, (audit, shown), fontsize=6.5, xytext=(4, -3 + 7 * (i % 2)), textcoords="offset points")
        left.set_ylim(floor - 0.01, None)
        nll, nll_se = summary[task]["dpo+nll"]["delta_exact_vs_dpo"]
        left.axhspan(nll - 2 * nll_se, nll + 2 * nll_se, color="#999999", alpha=0.25, label="NLL control ± 2 SE")
        left.axhline(0, color="black", lw=0.8)
        left.set_xlabel("audit: paired within-slot score")
        left.set_ylabel("Δ exact-answer prob vs DPO")
        left.set_title(f"{task}: gain vs audit score")
        left.legend(loc="upper left", fontsize=7)
        for algorithm, marker in (("grpo", "o"), ("rloo_token", "s"), ("ppo", "^")):
            runs = [
                (row["audit"], *row["delta_exact_vs_sparse_rl"], method.split(" ")[1])
                for method, row in summary[task].items()
                if method.startswith(f"{algorithm} ") and "delta_exact_vs_sparse_rl" in row
            ]
            for audit, d, se, source in runs:
                middle.errorbar(audit, d, yerr=se, fmt=marker, capsize=3, color=f"C{RL_ALGORITHMS.index(algorithm)}")
                middle.annotate(source, (audit, d), fontsize=6.5, xytext=(4, 2), textcoords="offset points")
            middle.plot([], [], marker, color=f"C{RL_ALGORITHMS.index(algorithm)}", label=f"{algorithm} vs sparse")
        middle.axhline(0, color="black", lw=0.8)
        middle.set_xlabel("audit: paired within-slot score")
        middle.set_ylabel("Δ exact-answer prob vs sparse RL")
        middle.set_title(f"{task}: online RL, dense credit vs sparse")
        middle.legend(loc="upper left", fontsize=7)
        for method in ("dpo", "dpo+nll", *(f"dpo+treg:{s}" for s in CURVES)):
            curves = [
                w["results"][method]["curve"] for w in worlds if w["task"] == task and w["results"][method]["curve"]
            ]
            if curves:  # seeds can have a few pairs more or less, so curves are cut to the shortest
                length = min(len(c) for c in curves)
                steps = [p["step"] for p in curves[0][:length]]
                mean = np.mean([[p["errors"] for p in c[:length]] for c in curves], axis=0)
                right.plot(steps, mean, marker="o", ms=3, label=method)
        right.set_xlabel("optimizer step")
        right.set_ylabel("sampled token error rate")
        right.set_title(f"{task}: learning curves (seed mean)")
        right.legend(fontsize=7)
    return finish(fig)


def metric_name(name: str) -> str:
    """MLflow takes letters, digits and _-. :/ in metric names."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("+", " plus "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(gym.TASKS), default=list(gym.TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--sft-problems", type=int, default=1000)
    parser.add_argument("--sft-steps", type=int, default=3000)
    parser.add_argument(
        "--pairs", type=int, default=160, help="prompts for the train pairs (and for the disjoint split)"
    )
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--audit-items", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="DPO's best of 3e-5, 1e-4, 3e-4 on walk seed 0")
    parser.add_argument("--lr-scales", nargs="+", type=float, default=[0.3, 1.0, 3.0])
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5, 2.0, 8.0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rl", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rl-iterations", type=int, default=10)
    parser.add_argument("--rl-lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--report-only", action="store_true", help="rebuild the table and figure from --out's JSON")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((args.out / "credit_gym.json").read_text())
        tasks = list(dict.fromkeys(w["task"] for w in saved["worlds"]))
        table, summary = summarize(saved["worlds"], tasks)
        print(saved["header"] + "\n" + table)
        (args.out / "credit_gym.json").write_text(json.dumps({**saved, "summary": summary}, indent=1, default=float))
        figure(saved["worlds"], summary, tasks).savefig(args.out / "credit_gym.png", dpi=110)
        return

    torch.manual_seed(0)
    started = time.perf_counter()
    workspace = Workspace.resolve()
    run = Run.start(workspace, "credit-gym", f"credit gym seeds={len(args.seeds)}")
    run.log_params({k: str(v) for k, v in vars(args).items()})
    worlds = []
    with tempfile.TemporaryDirectory(prefix="credit-gym-") as tmp:
        for task in args.tasks:
            for seed in args.seeds:
                world = run_world(task, seed, args, Path(tmp) / f"{task}-{seed}")
                worlds.append(world)
                exact = {
                    k: round(v["exact"], 3)
                    for k, v in world["results"].items()
                    if k in ("sft", "dpo", "dpo+nll", "dpo+treg:oracle_dense")
                }
                print(
                    f"[{time.perf_counter() - started:6.0f} s] {task} seed {seed}: {exact}", file=sys.stderr, flush=True
                )
                run.log_metrics(
                    {metric_name(f"{task}.{k}.exact"): v["exact"] for k, v in world["results"].items()}, step=seed
                )
    table, summary = summarize(worlds, args.tasks)
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"credit gym: tasks {args.tasks}, seeds {args.seeds}, {minutes:.1f} min on {torch.get_num_threads()} threads "
        f"(torch {torch.__version__}); alpha {args.alpha}, lr {args.lr}, {args.epochs} epochs of {args.pairs} prompts"
    )
    print(header + "\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "header": header,
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "worlds": worlds,
    }
    (args.out / "credit_gym.json").write_text(json.dumps(report, indent=1, default=float))  # first: the numbers
    fig = figure(worlds, summary, args.tasks)
    fig.savefig(args.out / "credit_gym.png", dpi=110)
    run.log_figure(fig, "credit_gym.png")
    run.log_text(header + "\n" + table, "credit_gym.md")
    run.log_dict(report, "credit_gym.json")
    run.end()


if __name__ == "__main__":
    main()
