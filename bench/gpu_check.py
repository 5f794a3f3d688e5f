"""The GPU check: one command, under 8 minutes on one H100/H200, one JSON line per measurement (bench/gpu_check.sh).

    bash bench/gpu_prepare.sh           # here, with the package registry: the wheels the GPU image lacks, in .whl/
    bash bench/gpu_check.sh             # there (carry .whl): Qwen2.5-0.5B-shaped model, random weights
    bash bench/gpu_check.sh --dry-run   # tiny shapes, every code path, on CPU too (CI runs this)

1. precision: the policy's step-0 gap |log π − log π_ref| per token, full fine-tuning (fp32 weights under bf16
   autocast) and LoRA (bf16 weights), the reference scored at the policy's precision (token_rewards.dtype: auto;
   must be under the stated tolerance) and at fp32 (the old default, reported).
2. token_rewards: the contrastive scoring path against a naive full-vocabulary forward (bench/token_rewards.py).
   Target: >= 300k tokens/s at <= 1/10 of the naive path's memory.
3. policy: the policy trainer (DPO + T-REG padded, packed, compiled, and FSDP2 in a 1-process group) against TRL's
   DPOTrainer in the same run, variable lengths, median real tokens/s and peak memory (bench/policy_opt.py).
   Target: >= 2x TRL.
4. total: the check's own wall time against its 8-minute target.

Correctness checks (1, and the agreement of the two scoring paths) fail the command; the speed targets are reported
with ``"met"`` and do not (a GPU's speed is a measurement, not a test).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from creditflow.flows.env import apply_defaults

apply_defaults()

BENCH = Path(__file__).resolve().parent
# Qwen2.5-0.5B: 24 layers, hidden 896, MLP 4864, 14 heads, 2 key/value heads, vocabulary 151936.
FULL = dict(layers=24, hidden=896, intermediate=4864, kv_heads=2, vocab=151936)
TINY = dict(layers=2, hidden=64, intermediate=128, kv_heads=1, vocab=512)
# T-REG padded (the default), packed (flex_attention or flash-attn varlen), compiled, FSDP2, and TRL as the baseline.
POLICY_VARIANTS = ("ours-treg", "ours-treg-packed", "ours-treg-compiled", "ours-fsdp", "trl-dpo")
TIME_TARGET_S = 480  # the whole check on one H100


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
    command += ["--variants", ",".join(POLICY_VARIANTS)]
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
    """The step-0 gap |log π − log π_ref| per token (and max |z|) of a fully fine-tuned policy (bf16 autocast over
    fp32 weights) and a LoRA one (bf16 weights), the reference scored at the policy's own precision (what
    token_rewards.dtype: auto does) and at fp32 (what it did before). On CPU (the dry run) both bf16 precisions are
    emulated: bf16 weights and CPU autocast."""
    import torch
    from token_rewards import load_pairs  # bench/token_rewards.py

    from creditflow.tasks.configs import LoraConfig, PolicyConfig, PreferenceLossConfig, TokenRewardsConfig
    from creditflow.tasks.credit.contrastive import encode_contrastive, score_contrastive
    from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
    from creditflow.tasks.models.precision import Precision, compute_precision, resolve_device
    from creditflow.tasks.models.tokenization import pad_token_id
    from creditflow.tasks.recipes.policy import REFERENCE_GAP_TOLERANCE, PolicyTrainer
    from creditflow.tasks.train.preference_batches import PolicyExample, SideTokens

    device = resolve_device()
    tokenizer = load_tokenizer(str(folder))
    prompts, completions = load_pairs(8)
    items = encode_contrastive(tokenizer, prompts, completions, TokenRewardsConfig(max_length=256))
    emulated = {"bf16-autocast": Precision(torch.float32, True), "bf16-params": Precision(torch.bfloat16, True)}

    def examples(scored_at: Precision) -> list[PolicyExample]:  # scored 8 rows at a time, trained 6 at a time
        model = load_reference_model(folder, device, scored_at.weights)
        with scored_at.autocast(device):
            scored = score_contrastive(model, items, 8, pad_token_id(tokenizer))
        del model
        side = lambda i: SideTokens(items[i].plain_ids, items[i].completion_ids, scored[i].ref_logps.tolist(), None)  # noqa: E731
        return [PolicyExample(str(i), side(2 * i), side(2 * i + 1)) for i in range(len(items) // 2)]

    records = []
    for mode, lora in (("bf16-autocast", None), ("bf16-params", LoraConfig())):
        policy = compute_precision(mode, device) if device.type == "cuda" else emulated[mode]
        config = PolicyConfig(
            lora=lora, loss=PreferenceLossConfig(alpha=0.0), token_reward_source="none", max_steps=1, batch_size=3
        )
        for scored_at in (policy, Precision(torch.float32)):
            trainer = PolicyTrainer(folder, examples(scored_at), config, progress=False, precision=policy)
            record = {"check": "precision", "what": f"step-0 gap, {mode} policy ({policy.label})"}
            record.update(reference=scored_at.label, **trainer.reference_gap())
            if scored_at == policy:  # what token_rewards.dtype: auto stores: z must start at 0
                record.update(tolerance=REFERENCE_GAP_TOLERANCE, ok=record["step0_logp_gap"] < REFERENCE_GAP_TOLERANCE)
            records.append(record)
            del trainer
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; runs on CPU")
    args = parser.parse_args()

    started = time.perf_counter()
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
    seconds = time.perf_counter() - started
    met = seconds <= TIME_TARGET_S
    records.append({"check": "total", "seconds": round(seconds), "target_s": TIME_TARGET_S, "met": met})
    for record in records:
        print(json.dumps(record), flush=True)
    failed = [r for r in records if r.get("ok") is False or r.get("agree") is False]
    if failed:
        sys.exit(f"{len(failed)} correctness check(s) failed: {[r.get('what', r['check']) for r in failed]}")


if __name__ == "__main__":
    main()
