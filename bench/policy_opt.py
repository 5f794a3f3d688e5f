"""Benchmark: the policy trainer (tasks/recipes/policy.py) against TRL's DPOTrainer on the same model, data and batch.

    ours-treg            PolicyTrainer, DPO + T-REG (alpha 0.25, contrastive r_hat), length-grouped batches
    ours-dpo             PolicyTrainer, plain DPO (alpha 0, no token rewards), length-grouped batches
    ours-dpo-ungrouped   the same in random order: what length grouping is worth on its own
    ours-fsdp            PolicyTrainer, DPO + T-REG, strategy fsdp (FSDP2) in a 1-process group
    ours-treg-packed     ours-treg with packing: true (each micro-batch in one padding-free row; flex_attention or
                         flash-attn varlen on CUDA, SDPA with a block mask on CPU)
    ours-treg-compiled   ours-treg with compile: true (torch.compile of the decoder, widths bucketed to 64)
    ours-treg-packed-compiled   both
    trl-dpo              trl.DPOTrainer, loss "sigmoid", precompute_ref_log_probs=True, gradient checkpointing off
                         (TRL defaults it on; ours is off), fed the exact same token ids (its tokenization skipped)

All train in fp32 on CPU (bf16 autocast on CUDA), same AdamW learning rate, batch, steps and seed. Every run is its
own subprocess, so its memory is its own: on CPU the growth of peak resident memory (VmHWM) during training, on CUDA
torch.cuda.max_memory_allocated. Speed is the median over the timed steps of

    real tokens of the step (prompt + chosen and prompt + rejected rows, no padding) / wall time between steps

with each trainer's own data pipeline, loss and metrics inside the step. Memory is measured over training only,
after imports, model loading, the optimizer and TRL's reference pass. Lengths are drawn per pair ("variable")
or all equal to the upper bound ("fixed"); both are run by default.

    .venv/bin/python bench/policy_opt.py
    .venv/bin/python bench/policy_opt.py --pairs 96 --steps 10 --vocab 49152 --lengths variable
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

from memory import reset_peak_rss, status_mib  # bench/memory.py, beside this script
from timing import trainer_step_times  # bench/timing.py

from creditflow.flows.env import apply_defaults

apply_defaults()

VARIANTS = (
    "ours-treg",
    "ours-dpo",
    "ours-dpo-ungrouped",
    "ours-fsdp",
    "ours-treg-packed",
    "ours-treg-compiled",
    "ours-treg-packed-compiled",
    "trl-dpo",
)
LEARNING_RATE = 1e-5
BETA = 0.1


# ---------------------------------------------------------------------------------------------------------
# Model and data (made once by the parent)


def build_model(folder: Path, args) -> None:
    """A Llama with random weights: tokenizer from the bundled sample text, vocabulary padded to ``--vocab`` rows."""
    import torch
    from transformers import LlamaForCausalLM

    from creditflow.tasks.models.tiny import build_tiny_tokenizer, tiny_llama_config

    sample = Path(__file__).resolve().parents[1] / "creditflow" / "data" / "sample_preferences.jsonl"
    texts = [json.loads(line)[k] for line in open(sample) for k in ("prompt", "chosen", "rejected")]
    tokenizer = build_tiny_tokenizer(folder, texts)
    torch.manual_seed(0)
    config = tiny_llama_config(
        tokenizer,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=args.kv_heads or max(1, args.hidden // 128),
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))


def build_examples(folder: Path, args, fixed: bool) -> list[dict]:
    """Random token ids with the reference model's log-probs and random r_hat in (-0.5, 0.5), as PolicyExample dicts."""
    import torch
    from transformers import AutoModelForCausalLM

    from creditflow.tasks.models.logprobs import completion_logprobs

    generator = torch.Generator().manual_seed(0)
    # on the GPU when there is one: 192 full-size sequences on a CPU would eat most of gpu_check's 10 minutes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(folder)).to(device).eval()

    def length(low: int, high: int) -> int:
        return high if fixed else int(torch.randint(low, high + 1, (1,), generator=generator))

    def ids(n: int) -> list[int]:
        return torch.randint(4, args.vocab, (n,), generator=generator).tolist()

    examples = []
    for i in range(args.pairs):
        prompt = ids(length(args.prompt_min, args.prompt_max))
        sides = {}
        for side in ("chosen", "rejected"):
            completion = ids(length(args.completion_min, args.completion_max))
            row = torch.tensor([prompt + completion], device=device)
            with torch.no_grad():
                ref = completion_logprobs(model, row, torch.ones_like(row), [len(prompt)], [len(completion)])[0]
            ref = ref.float().cpu()
            rewards = (torch.rand(len(completion), generator=generator) - 0.5).tolist()
            sides[side] = {"prompt_ids": prompt, "completion_ids": completion, "ref_logps": ref.tolist()}
            sides[side]["rewards"] = rewards
        examples.append({"pair_id": str(i), **sides})
    return examples


# ---------------------------------------------------------------------------------------------------------
# One variant per process


def setup_ours(args, examples: list[dict], device):
    """(train, step end times, real tokens per step) for PolicyTrainer, model loaded and trainer built."""
    from creditflow.tasks.configs import PolicyConfig, PreferenceLossConfig
    from creditflow.tasks.recipes.policy import PolicyTrainer
    from creditflow.tasks.train.preference_batches import PolicyExample, epoch_batches

    treg = args.variant.startswith("ours-treg") or args.variant == "ours-fsdp"
    if not treg:
        for example in examples:
            example["chosen"]["rewards"] = example["rejected"]["rewards"] = None
    config = PolicyConfig(
        loss=PreferenceLossConfig(loss_type="dpo", beta=BETA, alpha=0.25 if treg else 0.0),
        token_reward_source="contrastive" if treg else "none",
        learning_rate=LEARNING_RATE,
        warmup_ratio=0.0,
        max_steps=args.steps,
        epochs=args.steps,
        batch_size=args.batch_size,
        length_grouped=args.variant != "ours-dpo-ungrouped",
        save_every=10**9,
        strategy="fsdp" if args.variant == "ours-fsdp" else "ddp",
        packing="packed" in args.variant,
        compile="compiled" in args.variant,
    )
    if config.strategy == "fsdp":  # FSDP needs a process group, even of one
        import os

        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    examples = [PolicyExample.from_dict(e) for e in examples]
    ends: list[float] = []
    trainer = PolicyTrainer(
        args.folder, examples, config, on_step=lambda s, m: ends.append(time.perf_counter()), progress=False
    )
    # The trainer's batches are a function of (seed, epoch): recompute them to count each step's real tokens.
    tokens = []
    for epoch in range(config.epochs):
        for batch in epoch_batches(
            [e.length for e in examples], config.batch_size, config.seed, epoch, config.length_grouped
        ):
            sides = [s for i in batch for s in (examples[i].chosen, examples[i].rejected)]
            tokens.append(sum(len(s.prompt_ids) + len(s.completion_ids) for s in sides))

    def train() -> None:
        ends.append(time.perf_counter())
        trainer.train()

    return train, ends, tokens


def setup_trl(args, examples: list[dict], device):
    """(train, step end times, real tokens per step) for TRL's DPOTrainer on the same ids (reference precomputed)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids already: the ids our trainer sees

    dataset = Dataset.from_list(
        [
            {
                "prompt_ids": e["chosen"]["prompt_ids"],
                "chosen_ids": e["chosen"]["completion_ids"],
                "rejected_ids": e["rejected"]["completion_ids"],
            }
            for e in examples
        ]
    )
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_steps=args.steps,
        beta=BETA,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        gradient_checkpointing=False,
        max_length=None,
        bf16=device.type == "cuda",
        pad_to_multiple_of=64 if device.type == "cuda" else None,
        logging_steps=10**9,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    ends: list[float] = []

    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    trainer = PretokenizedDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(args.folder)
    )
    collate, tokens = trainer.data_collator, []

    def counting_collator(features):
        batch = collate(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.add_callback(trainer_step_times(ends))
    return trainer.train, ends, tokens


def worker(args) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    examples = torch.load(args.examples, weights_only=True)
    train, ends, tokens = (setup_trl if args.variant == "trl-dpo" else setup_ours)(args, examples, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    loaded = status_mib("VmRSS")  # imports, model, optimizer (and TRL's reference pass) are done: training only
    train()
    rates = [n / (b - a) for n, a, b in zip(tokens, ends, ends[1:])][args.warmup :]
    report = {
        "variant": args.variant,
        "device": str(device),
        "steps": len(ends) - 1,
        "tokens_per_s": statistics.median(rates),
        "step_s": statistics.median([b - a for a, b in zip(ends, ends[1:])][args.warmup :]),
        "peak_rss_mib": status_mib("VmHWM"),
        "rss_growth_mib": status_mib("VmHWM") - loaded,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------------------------


def print_table(mode: str, reports: dict[str, list[dict]], repeats: int, as_json: bool = False) -> None:
    """Medians per variant and their ratios to TRL (or to the last variant when TRL was not run); with ``as_json``
    one JSON line per variant instead."""
    variants = list(reports)

    def median(variant: str, field: str) -> float:
        return statistics.median(r[field] for r in reports[variant])

    if as_json:
        memory = "cuda_peak_mib" if reports[variants[0]][0]["cuda_peak_mib"] is not None else "rss_growth_mib"
        baseline = "trl-dpo" if "trl-dpo" in variants else variants[-1]
        for variant in variants:
            speed = median(variant, "tokens_per_s")
            record = {"check": "policy", "variant": variant, "lengths": mode, "device": reports[variant][0]["device"]}
            record.update(tokens_per_s=round(speed), peak_memory_mib=round(median(variant, memory)))
            record[f"speed_vs_{baseline}"] = round(speed / median(baseline, "tokens_per_s"), 3)
            print(json.dumps(record), flush=True)
        return

    memory = "cuda_peak_mib" if reports[variants[0]][0]["cuda_peak_mib"] is not None else "rss_growth_mib"
    baseline = "trl-dpo" if "trl-dpo" in variants else variants[-1]
    print(f"\n{mode} lengths, {reports[variants[0]][0]['device']}, median of {repeats} run(s)")
    print(f"{'variant':20} {'tokens/s':>9} {'step s':>7} {memory:>15} {'speed vs ' + baseline:>18} {'memory vs':>10}")
    for variant in variants:
        speed, mem = median(variant, "tokens_per_s"), median(variant, memory)
        print(
            f"{variant:20} {speed:9.0f} {median(variant, 'step_s'):7.3f} {mem:15.0f} "
            f"{speed / median(baseline, 'tokens_per_s'):17.2f}x {mem / median(baseline, memory):9.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (2x rows per forward)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--prompt-min", type=int, default=16)
    parser.add_argument("--prompt-max", type=int, default=128)
    parser.add_argument("--completion-min", type=int, default=16)
    parser.add_argument("--completion-max", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8/3 hidden)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default hidden / 128)")
    parser.add_argument("--json", action="store_true", help="one JSON line per variant instead of a table")
    parser.add_argument("--lengths", choices=["variable", "fixed", "both"], default="both")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved; medians reported")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--examples", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return worker(args)

    import torch
    from safetensors.torch import load_file

    scratch = Path(tempfile.mkdtemp(prefix="bench-policy-"))
    build_model(scratch / "model", args)
    variants = args.variants.split(",")
    modes = ["variable", "fixed"] if args.lengths == "both" else [args.lengths]
    params = sum(t.numel() for t in load_file(scratch / "model" / "model.safetensors").values())
    print(
        ("# " if args.json else "")
        + f"Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} ({params / 1e6:.1f}M params, tied); "
        f"{args.pairs} pairs, batch {args.batch_size} pairs, {args.steps} steps ({args.warmup} warm-up left out); "
        f"prompt {args.prompt_min}-{args.prompt_max}, completions {args.completion_min}-{args.completion_max} tokens; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for mode in modes:
        torch.save(build_examples(scratch / "model", args, fixed=mode == "fixed"), scratch / f"{mode}.pt")
        reports: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                command = [sys.executable, __file__, "--variant", variant, "--folder", str(scratch / "model")]
                command += ["--examples", str(scratch / f"{mode}.pt"), "--steps", str(args.steps)]
                command += ["--batch-size", str(args.batch_size), "--warmup", str(args.warmup)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{variant} failed:\n{done.stderr[-4000:]}")
                reports[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))

        print_table(mode, reports, args.repeats, args.json)


if __name__ == "__main__":
    main()
