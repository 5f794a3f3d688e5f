"""The step-0 gap between a policy and its stored reference log-probs, for every pair of precisions, on CPU.

At step 0 the policy is the reference, so |log π − log π_ref| per token (and DPO's z) must be 0 up to the rounding of
other batch shapes; a reference scored at another precision than the policy computes with starts DPO away from 0.
GPU precisions are emulated on CPU: bf16 weights and CPU bf16 autocast (the same Precision objects CUDA resolves to).

    .venv/bin/python bench/reference_precision.py                      # 4 layers, width 128
    .venv/bin/python bench/reference_precision.py --layers 2 --hidden 64
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch

from creditflow.flows.env import apply_defaults

apply_defaults()

WORDS = "the quick brown fox jumps over the lazy dog a helpful answer is correct and concise".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()

    from creditflow.tasks.configs import LoraConfig, PolicyConfig, PreferenceLossConfig, TokenRewardsConfig
    from creditflow.tasks.credit.contrastive import encode_contrastive, score_contrastive
    from creditflow.tasks.models.loading import load_reference_model, load_tokenizer
    from creditflow.tasks.models.precision import Precision
    from creditflow.tasks.models.tiny import build_tiny_causal_lm
    from creditflow.tasks.models.tokenization import pad_token_id
    from creditflow.tasks.recipes.policy import PolicyTrainer
    from creditflow.tasks.train.preference_batches import PolicyExample, SideTokens

    cpu = torch.device("cpu")
    shape = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    folder = build_tiny_causal_lm(tempfile.mkdtemp(), [" ".join(WORDS)] * 20, **shape)
    tokenizer = load_tokenizer(str(folder))
    rng = random.Random(0)
    n = 2 * args.pairs
    prompts = [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}] for _ in range(n)]
    answers = [[{"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(4, 30)))}] for _ in range(n)]
    items = encode_contrastive(tokenizer, prompts, answers, TokenRewardsConfig(max_length=256))

    def examples(scored_at: Precision) -> list[PolicyExample]:  # scored 5 rows at a time, trained 6 at a time
        model = load_reference_model(folder, cpu, scored_at.weights)
        with scored_at.autocast(cpu):
            scored = score_contrastive(model, items, 5, pad_token_id(tokenizer))
        side = lambda i: SideTokens(items[i].plain_ids, items[i].completion_ids, scored[i].ref_logps.tolist(), None)  # noqa: E731
        return [PolicyExample(str(i), side(2 * i), side(2 * i + 1)) for i in range(args.pairs)]

    precisions = {
        "bf16 weights + autocast": Precision(torch.bfloat16, True),
        "fp32 weights + autocast": Precision(torch.float32, True),
        "fp32": Precision(torch.float32),
        "bf16 weights": Precision(torch.bfloat16),
    }
    print(f"tiny Llama, {args.layers} layers, width {args.hidden}, {args.pairs} pairs; torch {torch.__version__}")
    print("| policy computes at | reference scored at | step-0 gap, nats per token (mean) | max |z| |")
    print("|---|---|---|---|")
    for policy_name in ("bf16 weights + autocast", "fp32 weights + autocast", "fp32"):
        policy = precisions[policy_name]
        lora = LoraConfig() if policy.weights == torch.bfloat16 else None  # bf16 weights: a LoRA policy's base
        config = PolicyConfig(
            lora=lora, loss=PreferenceLossConfig(alpha=0.0), token_reward_source="none", batch_size=3, max_steps=1
        )
        for reference_name, reference in precisions.items():
            trainer = PolicyTrainer(folder, examples(reference), config, progress=False, precision=policy)
            gap = trainer.reference_gap()
            print(f"| {policy_name} | {reference_name} | {gap['step0_logp_gap']:.2g} | {gap['step0_max_abs_z']:.2g} |")


if __name__ == "__main__":
    main()
