"""How long the light CLI entry points take, against importing every stage's ML code (what they used to pay).

    .venv/bin/python bench/cli_startup.py [--repeats 5]

Each command runs in a fresh process ``--repeats`` times; the median wall time is printed with its ratio to the
baseline, a process that imports every stage recipe (torch, transformers, peft, Prefect, MLflow). Absolute times
mean something only on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "creditflow.flows.cli"]
DEMO = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
COMMANDS = {
    "creditflow --help": [*CLI, "--help"],
    "creditflow config": [*CLI, "config"],
    "creditflow config -c demo.yaml --set ...": [*CLI, "config", "-c", DEMO, "--set", "policy.learning_rate=1e-4"],
    "a config typo (exit 2)": [*CLI, "config", "--set", "policy.learnin_rate=1e-4"],
}
BASELINE = [
    sys.executable,
    "-c",
    "import creditflow.flows.pipeline, creditflow.tasks.recipes.policy, creditflow.tasks.recipes.token_rewards, "
    "creditflow.tasks.recipes.evaluate, creditflow.tasks.recipes.onpolicy, creditflow.tasks.recipes.reward_model",
]


def median_seconds(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    baseline = median_seconds(BASELINE, args.repeats)
    print(f"{'baseline: import every stage recipe':<45} {baseline:6.2f} s")
    for name, command in COMMANDS.items():
        seconds = median_seconds(command, args.repeats)
        print(f"{name:<45} {seconds:6.2f} s   {seconds / baseline:5.2f}x baseline")


if __name__ == "__main__":
    main()
