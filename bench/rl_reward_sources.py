"""ABC's headline, measured: online RL with sparse vs ABC-dense vs contrastive-dense rewards at equal sample budgets.

    .venv/bin/python bench/rl_reward_sources.py [--config configs/demo.yaml] [--seeds 0 1 2] [--iterations 12]
        [--sources sparse abc contrastive] [--out docs/rl_reward_sources.jsonl] [--figure docs/rl_reward_sources.png]
        [-w bench-workspace]

The curated pairs and the reward model come from the config's curate and reward_model stages (run, or reused from
the workspace's cache); the RL runs use the RL trainer directly (tasks/recipes/rl.py) with the same settings except
``reward_source`` and ``seed``. Gold = vaderSentiment on every iteration's rollouts (the bundled task's judge).
Prints one JSON line per run (gold, reward and KL per iteration) and writes them to ``--out`` as each run ends, then
a table of the gold score at fixed budgets and the KL to pi_ref at the last one (mean +- std over seeds); draws the
gold-vs-samples curves of every source in one figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from creditflow.flows.env import apply_defaults

apply_defaults()

RL_SETTINGS = dict(  # LoRA PPO on SmolLM2: equal for every source, only reward_source and seed vary
    algorithm="ppo",
    batch_size=8,
    samples_per_prompt=2,
    learning_rate=2e-4,
    ppo_epochs=2,
    minibatches=2,
    kl_coef=0.05,
    lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    # T = 1 over the whole vocabulary, the only rollouts rl accepts (the recorded table sampled with top_k 50).
    sampling={"max_new_tokens": 24, "batch_size": 16},
    contrastive_template="guideline",  # the preset the recorded table used
    gold_scorer="vader",
)


def main() -> None:
    import numpy as np

    from creditflow.flows.config import load_config
    from creditflow.flows.pipeline import curate_flow, reward_model_flow
    from creditflow.storage.workspace import Workspace
    from creditflow.tasks.configs import RLConfig
    from creditflow.tasks.data.schema import split_rows, unique_prompts
    from creditflow.tasks.models.resolve import resolve_model
    from creditflow.tasks.plots import finish, new_figure
    from creditflow.tasks.recipes.rl import RLTrainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--sources", nargs="+", default=["sparse", "abc", "contrastive"])
    parser.add_argument("--out", default="docs/rl_reward_sources.jsonl", help="per-run JSON lines")
    parser.add_argument("--figure", default="docs/rl_reward_sources.png")
    parser.add_argument("-w", "--workspace", default="bench-workspace")
    args = parser.parse_args()

    cfg = load_config(args.config).model_dump(mode="json")
    ws = Workspace.resolve(args.workspace)
    curate = curate_flow(config=cfg, workspace=str(ws.root), progress=False)["manifest"]
    reward = reward_model_flow(config=cfg, workspace=str(ws.root), progress=False)["manifest"]
    pairs = ws.store.read_table(ws.store.load("curate", curate["fingerprint"]), "pairs")
    prompts = unique_prompts(split_rows(pairs, "train"), None).column("prompt").to_pylist()
    rm_dir = ws.store.path("reward_model", reward["fingerprint"]) / "model"
    reference = resolve_model(cfg["reference_model"])

    curves: dict[str, list[list[float]]] = {}
    kls: dict[str, list[list[float]]] = {}
    samples_axis: list[float] = []
    Path(args.out).write_text("")  # then one line per finished run: a killed bench keeps the runs it finished
    for source in args.sources:
        for seed in args.seeds:
            run = dict(enabled=True, reward_source=source, seed=seed, epochs=50, max_steps=args.iterations)
            config = RLConfig.model_validate(
                {**RL_SETTINGS, **run, "sampling": {**RL_SETTINGS["sampling"], "seed": seed}}
            )
            started = time.perf_counter()
            trainer = RLTrainer(reference, rm_dir, prompts, config, rm_max_length=cfg["reward_model"]["max_length"])
            history = trainer.train()
            gold, kl = [h["gold"] for h in history], [h["kl"] for h in history]
            curves.setdefault(source, []).append(gold)
            kls.setdefault(source, []).append(kl)
            samples_axis = [h["samples"] for h in history]
            record = {"source": source, "seed": seed, "gold": gold, "reward": [h["reward"] for h in history]}
            record.update(kl=kl, seconds=round(time.perf_counter() - started, 1))
            print(json.dumps(record), flush=True)
            with open(args.out, "a") as out:
                out.write(json.dumps(record) + "\n")

    def cell(runs: list[list[float]], end: int, digits: int) -> str:
        # the last 3 iterations up to ``end``, averaged per seed: one iteration's 16 rollouts are noisy
        per_seed = np.array(runs)[:, max(0, end - 3) : end].mean(1)
        return f"{per_seed.mean():.{digits}f} ± {per_seed.std(ddof=1) if len(per_seed) > 1 else 0:.{digits}f}"

    n = len(samples_axis)
    budgets = sorted({samples_axis[max(0, n // 3 - 1)], samples_axis[max(0, 2 * n // 3 - 1)], samples_axis[-1]})
    ends = [samples_axis.index(budget) + 1 for budget in budgets]
    header = [f"gold @ {int(b)} samples" for b in budgets] + [f"KL to pi_ref @ {int(budgets[-1])} samples"]
    print("\n| reward source | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for source, runs in curves.items():
        cells = [cell(runs, end, 3) for end in ends] + [cell(kls[source], ends[-1], 2)]
        print(f"| {source} | " + " | ".join(cells) + " |")

    fig, (ax,) = new_figure(1, (6.5, 4))
    for source, runs in curves.items():
        gold = np.array(runs)
        ax.plot(samples_axis, gold.mean(0), label=f"{source} (n={len(runs)} seeds)", marker="o", ms=3)
        ax.fill_between(samples_axis, gold.min(0), gold.max(0), alpha=0.15)
    ax.set_xlabel("rollouts sampled")
    ax.set_ylabel("gold (vader) of the rollouts")
    ax.set_title("PPO on the bundled task: mean over seeds, band = min..max")
    ax.legend()
    finish(fig).savefig(args.figure, dpi=120, bbox_inches="tight")
    print(f"\nfigure: {args.figure}, runs: {args.out}")


if __name__ == "__main__":
    main()
