"""The GPU check: one command, under 10 minutes on one H100/H200, one JSON line per measurement (bench/gpu_check.sh).

    bash bench/gpu_check.sh             # Qwen2.5-0.5B-shaped model (random weights, built from a config)
    bash bench/gpu_check.sh --dry-run   # tiny shapes, every code path, on CPU too (CI runs this)

1. policy: the policy trainer (DPO, DPO + T-REG, and FSDP2 in a 1-process group) against TRL's DPOTrainer in the
   same run, variable lengths, median real tokens/s and peak memory (bench/policy_opt.py). Target: >= 2x TRL.
2. token_rewards: the contrastive scoring path against a naive full-vocabulary forward (bench/token_rewards.py).
   Target: >= 300k tokens/s at <= 1/10 of the naive path's memory.
3. precision: the reference log-probs the token-reward stage stores, and the policy's step-0 loss, in bf16 against
   fp32. At step 0 the policy is the reference, so z = 0 and the DPO loss is log 2 in both precisions.

Correctness checks (3, and the agreement of the two scoring paths) fail the command; the speed targets are reported
with ``"met"`` and do not (a GPU's speed is a measurement, not a test).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from creditflow.flows.env import apply_defaults

apply_defaults()

BENCH = Path(__file__).resolve().parent
# Qwen2.5-0.5B: 24 layers, hidden 896, MLP 4864, 14 heads, 2 key/value heads, vocabulary 151936.
FULL = dict(layers=24, hidden=896, intermediate=4864, kv_heads=2, vocab=151936)
TINY = dict(layers=2, hidden=64, intermediate=128, kv_heads=1, vocab=512)


def run_json(command: list[str]) -> list[dict]:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command[:3])} failed:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def policy_check(shape: dict, dry_run: bool) -> list[dict]:
    sizes = ["--pairs", "8", "--steps", "3", "--warmup", "1", "--prompt-max", "16", "--completion-max", "24"]
    if not dry_run:
        sizes = ["--pairs", "96", "--steps", "12", "--warmup", "3", "--prompt-min", "64", "--prompt-max", "256"]
        sizes += ["--completion-min", "128", "--completion-max", "512"]
    command = [sys.executable, str(BENCH / "policy_opt.py"), *sizes, "--lengths", "variable", "--json"]
    command += ["--variants", "ours-dpo,ours-treg,ours-fsdp,trl-dpo"]
    for key, value in shape.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    records = run_json(command)
    for record in records:
        if record["variant"] != "trl-dpo":
            record.update(target="speed_vs_trl-dpo >= 2", met=record["speed_vs_trl-dpo"] >= 2)
    return records


def token_reward_check(folder: Path, dry_run: bool) -> list[dict]:
    sizes = ["--pairs", "4", "--batch-size", "4", "--repeats", "1"] if dry_run else ["--pairs", "256"]
    if not dry_run:
        sizes += ["--batch-size", "32", "--repeats", "2"]
    records = run_json([sys.executable, str(BENCH / "token_rewards.py"), "--model", str(folder), *sizes, "--json"])
    for record in records:
        record.update(
            target="ours >= 300k tokens/s at <= 0.1 of naive memory",
            met=record["ours_tokens_per_s"] >= 300_000 and record["memory_vs_naive"] <= 0.1,
            agree=record["max_diff"] < (5e-2 if record["dtype"] == "bfloat16" else 1e-4),
        )
    return records


def precision_check(folder: Path) -> list[dict]:
    """bf16 vs fp32: stored reference log-probs, and the policy's step-0 DPO loss (log 2 when pi = pi_ref)."""
    import torch
    from token_rewards import load_pairs  # bench/token_rewards.py

    from creditflow.tasks.configs import PolicyConfig, PreferenceLossConfig, TokenRewardsConfig
    from creditflow.tasks.credit.contrastive import encode_contrastive, score_contrastive
    from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
    from creditflow.tasks.models.precision import resolve_device
    from creditflow.tasks.models.tokenization import pad_token_id
    from creditflow.tasks.recipes.policy import PolicyTrainer
    from creditflow.tasks.train.preference_batches import PolicyExample, SideTokens

    device = resolve_device()
    tokenizer = load_tokenizer(str(folder))
    prompts, completions = load_pairs(8)
    items = encode_contrastive(tokenizer, prompts, completions, TokenRewardsConfig(max_length=256))
    scored = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_reference_model(folder, device, dtype)
        scored[dtype] = score_contrastive(model, items, 8, pad_token_id(tokenizer))
        del model
    ref_diff = max(
        float(abs(a.ref_logps - b.ref_logps).max()) for a, b in zip(scored[torch.float32], scored[torch.bfloat16])
    )
    records = [{"check": "precision", "what": "reference log-probs, bf16 vs fp32", "max_abs_diff": ref_diff}]
    records[0].update(tolerance=0.25, ok=ref_diff < 0.25)

    def side(i: int) -> SideTokens:  # stored fp32 reference log-probs, as the policy stage reads them
        item = items[i]
        ref = scored[torch.float32][i].ref_logps.tolist()
        return SideTokens(item.plain_ids, item.completion_ids, ref, None)

    examples = [PolicyExample(str(i), side(2 * i), side(2 * i + 1)) for i in range(len(items) // 2)]
    losses = {}
    for bf16 in (False, True):
        config = PolicyConfig(
            loss=PreferenceLossConfig(alpha=0.0), token_reward_source="none", max_steps=1, batch_size=4, bf16=bf16
        )
        trainer = PolicyTrainer(folder, examples, config, progress=False)
        losses["bf16" if bf16 and device.type == "cuda" else "fp32"] = trainer.train()[0]["loss"]
        del trainer
    for name, loss in losses.items():
        record = {"check": "precision", "what": f"step-0 DPO loss ({name} policy, fp32 reference)", "loss": loss}
        record.update(expected=math.log(2), tolerance=2e-2, ok=abs(loss - math.log(2)) < 2e-2)
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on CPU")
    args = parser.parse_args()

    sys.path.insert(0, str(BENCH))
    import torch
    from policy_opt import build_model

    shape = TINY if args.dry_run else FULL
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "model"
    build_model(folder, argparse.Namespace(**shape))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        json.dumps({"check": "setup", "device": device, "dry_run": args.dry_run, **shape, "torch": torch.__version__})
    )
    records = [*precision_check(folder), *token_reward_check(folder, args.dry_run), *policy_check(shape, args.dry_run)]
    for record in records:
        print(json.dumps(record), flush=True)
    failed = [r for r in records if r.get("ok") is False or r.get("agree") is False]
    if failed:
        sys.exit(f"{len(failed)} correctness check(s) failed: {[r.get('what', r['check']) for r in failed]}")


if __name__ == "__main__":
    main()
