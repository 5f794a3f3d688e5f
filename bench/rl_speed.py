"""Benchmark: the RL stage's trainer (tasks/recipes/rl.py) against TRL 1.16's RLOOTrainer and GRPOTrainer (vLLM off)
on the same tiny models, prompts and settings, in the same run.

Both sample ``--k`` completions for each of ``--prompts`` prompts per step, score them with the same reward model
(a sequence classifier), take one optimizer step per generation batch (no reuse of rollouts), with a KL penalty to
the reference (beta 0.05: in the reward for RLOO, a k3 loss term for GRPO, as TRL does), and run ``--steps``
steps. Speed is rollouts per second of wall time between the ends of consecutive steps (median over the steps after
``--warmup``), each trainer in its own subprocess. TRL runs twice: with gradient checkpointing off, as ours (the
like-for-like ratio), and with its default, on. TRL ships no PPOTrainer any more, so PPO has no baseline here.

One more step after the timed ones runs under torch's FlopCounterMode and gives each trainer's matmul work per step
(sampling, the frozen models' passes, forward and backward; attention scores, about 1% here, have no CPU formula and
are left out). Its ratio, TRL's FLOPs over ours, is about the speed ratio that exact computation reaches when both run
their FLOPs equally fast: past it, a trainer must run its matmuls faster per FLOP, not do fewer.

``--system-words N`` puts a system message of N words before every prompt, as real GRPO set-ups carry instructions
and few-shot context; the k completions of a prompt share its tokens.

    .venv/bin/python bench/rl_speed.py [--algorithms rloo grpo] [--steps 8] [--prompts 8] [--k 4] [--max-new-tokens 32]
        [--system-words 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import trainer_step_times  # bench/timing.py, beside this script
from torch.utils.flop_counter import FlopCounterMode

from creditflow.flows.env import apply_defaults

apply_defaults()

SAMPLE = Path(__file__).resolve().parents[1] / "creditflow" / "data" / "sample_preferences.jsonl"


def prompts(n: int, system_words: int = 0) -> list[list[dict]]:
    rows = [json.loads(line) for line in open(SAMPLE)]
    system = []
    if system_words:  # the same words for every prompt, from the sample's answers
        words = " ".join(row["chosen"] for row in rows).split()
        system = [{"role": "system", "content": " ".join(words[:system_words])}]
    return [[*system, {"role": "user", "content": row["prompt"]}] for row in rows[:n]]


def build_models(folder: Path) -> tuple[Path, Path]:
    from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone

    texts = [json.loads(line)[k] for line in open(SAMPLE) for k in ("prompt", "chosen", "rejected")]
    size = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    policy = build_tiny_causal_lm(folder / "policy", texts, **size)
    reward = build_tiny_reward_backbone(folder / "reward", texts, **size)
    return policy, reward


def run_ours(args) -> tuple[list[float], int]:
    from creditflow.tasks.configs import RLConfig
    from creditflow.tasks.recipes.rl import RLTrainer

    config = RLConfig(
        algorithm=args.algorithm,
        reward_source="sparse",
        kl_penalty="loss" if args.algorithm == "grpo" else "reward",
        batch_size=args.prompts,
        samples_per_prompt=args.k,
        ppo_epochs=1,
        minibatches=1,
        kl_coef=0.05,
        learning_rate=1e-5,
        epochs=args.steps + 1,
        max_steps=args.steps + 1,  # the last step counts FLOPs, untimed
        gold_scorer=None,
        sampling={"max_new_tokens": args.max_new_tokens, "batch_size": args.prompts},
    )
    ends: list[float] = []  # as TRL's: wall time between the ends of consecutive steps
    counter = FlopCounterMode(display=False)

    def on_step(step: int, _metrics) -> None:
        ends.append(time.perf_counter())
        count_flops(counter, step, args.steps)

    trainer = RLTrainer(
        args.policy,
        args.reward,
        prompts(args.prompts * (args.steps + 1), args.system_words),
        config,
        progress=False,
        on_step=on_step,
    )
    ends.append(time.perf_counter())
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])][: args.steps], counter.get_total_flops()


def count_flops(counter: FlopCounterMode, step: int, timed_steps: int) -> None:
    """Enter ``counter`` after the last timed step, leave it after the one step it counts."""
    if step == timed_steps:
        counter.__enter__()
    elif step == timed_steps + 1:
        counter.__exit__(None, None, None)


def run_trl(args) -> tuple[list[float], int]:
    import warnings

    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    warnings.filterwarnings("ignore")
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    reward_tokenizer = AutoTokenizer.from_pretrained(args.reward)
    reward_model = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1)
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
    Config, Trainer = (GRPOConfig, GRPOTrainer) if args.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    config = Config(
        output_dir=tempfile.mkdtemp(prefix=f"bench-trl-{args.algorithm}-"),
        per_device_train_batch_size=args.prompts * args.k,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        num_iterations=1,
        beta=0.05,
        learning_rate=1e-5,
        max_steps=args.steps + 1,  # the last step counts FLOPs, untimed
        temperature=1.0,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=False,
        gradient_checkpointing=args.trl_checkpointing,  # TRL's default is on; ours is off
        seed=0,
    )
    ends: list[float] = []
    counter = FlopCounterMode(display=False)

    class CountFlops(TrainerCallback):
        def on_step_end(self, _args, state, *_, **__):
            count_flops(counter, state.global_step, args.steps)

    trainer = Trainer(
        model=args.policy,
        reward_funcs=reward_model,
        args=config,
        train_dataset=Dataset.from_list(
            [{"prompt": p} for p in prompts(args.prompts * (args.steps + 1), args.system_words)]
        ),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizer,
        callbacks=[trainer_step_times(ends), CountFlops()],
    )
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])][: args.steps], counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", choices=["rloo", "grpo"], default=["rloo", "grpo"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--system-words", type=int, default=0)
    parser.add_argument("--trainer", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--trl-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", choices=["rloo", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--reward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        seconds, flops = (run_ours if args.trainer == "ours" else run_trl)(args)
        print(json.dumps({"trainer": args.trainer, "step_seconds": seconds, "flops": flops}))
        return

    import torch
    from transformers import AutoTokenizer

    from creditflow.tasks.models.tokenization import encode_prompts

    policy, reward = build_models(Path(tempfile.mkdtemp(prefix="bench-rl-")))
    rollouts = args.prompts * args.k
    tokenizer = AutoTokenizer.from_pretrained(policy)
    sample = prompts(args.prompts * args.steps, args.system_words)
    prompt_tokens = statistics.mean(map(len, encode_prompts(tokenizer, sample)))
    print(
        f"tiny Llama (4 layers, hidden 256), {args.prompts} prompts x k={args.k} (prompts of {prompt_tokens:.0f} "
        f"tokens on average), {args.max_new_tokens} new tokens, {args.steps} steps ({args.warmup} left out); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for algorithm in args.algorithms:
        results, gflops = {}, {}
        runs = (("ours", "ours", []), ("trl", "trl", []), ("trl-gc", "trl", ["--trl-checkpointing"]))
        for name, trainer, extra in runs:
            command = [sys.executable, __file__, "--trainer", trainer, "--algorithm", algorithm, *extra]
            command += ["--policy", str(policy), "--reward", str(reward), "--steps", str(args.steps)]
            command += [
                "--prompts",
                str(args.prompts),
                "--k",
                str(args.k),
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--system-words",
                str(args.system_words),
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{trainer} {algorithm} failed:\n{done.stderr[-4000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            results[name] = rollouts / statistics.median(measured["step_seconds"][args.warmup :])
            gflops[name] = measured["flops"] / 1e9
        baseline = "GRPOTrainer" if algorithm == "grpo" else "RLOOTrainer"
        print(
            f"{algorithm:5} ours {results['ours']:5.1f} rollouts/s; TRL {baseline} {results['trl']:5.1f} with our "
            f"settings (gradient checkpointing off): {results['ours'] / results['trl']:.2f}x; "
            f"{results['trl-gc']:5.1f} with its default checkpointing on: {results['ours'] / results['trl-gc']:.2f}x",
            flush=True,
        )
        print(
            f"{'':5} matmul GFLOP per step: ours {gflops['ours']:.1f}, TRL {gflops['trl']:.1f} "
            f"({gflops['trl'] / gflops['ours']:.2f}x ours), {gflops['trl-gc']:.1f} with checkpointing "
            f"({gflops['trl-gc'] / gflops['ours']:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
