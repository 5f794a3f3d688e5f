"""Benchmark: T-REG contrastive token rewards, our path vs the naive one, on the same pairs in the same run.

    ours   sequences sorted by length, fused LM head + chunked fp32 logsumexp on completion positions only
           (tasks/token_rewards.score_contrastive)
    naive  sequences in data order, full [B, S, V] logits and their fp32 log_softmax, then gather

Each path runs in its own subprocess so its peak memory is its own: on CPU the peak RSS of the timed section and its
growth over the RSS before it (the model and tokenizer excluded), on CUDA torch.cuda.max_memory_allocated. Both
count the same non-pad tokens, so tokens/s compare directly, and the parent checks that both produce the same
rewards and reference log-probs.

    .venv/bin/python bench/token_rewards.py                       # SmolLM2-135M (tiny model if not installed)
    .venv/bin/python bench/token_rewards.py --model tiny --pairs 64
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

from creditflow.flows.env import apply_defaults

apply_defaults()

SAMPLE = Path(__file__).resolve().parents[1] / "creditflow" / "data" / "sample_preferences.jsonl"


def load_pairs(n: int) -> tuple[list, list]:
    prompts, completions = [], []
    with open(SAMPLE) as handle:
        for line in handle:
            row = json.loads(line)
            if not (row["chosen"].strip() and row["rejected"].strip()):
                continue
            for side in ("chosen", "rejected"):
                prompts.append([{"role": "user", "content": row["prompt"]}])
                completions.append([{"role": "assistant", "content": row[side]}])
            if len(prompts) == 2 * n:
                break
    return prompts, completions


def model_folder(spec: str) -> tuple[Path, str]:
    """The model to benchmark: a spec for tasks/models/resolve.py, or a tiny Llama built from the sample
    (the fallback)."""
    from creditflow.tasks.models.resolve import resolve_model

    if spec != "tiny":
        try:
            return resolve_model(spec), spec
        except ModuleNotFoundError as exc:
            print(f"{exc}\nfalling back to the tiny model", file=sys.stderr)
    from creditflow.tasks.models.tiny import build_tiny_causal_lm

    texts = [json.loads(line)[k] for line in open(SAMPLE) for k in ("prompt", "chosen", "rejected")]
    folder = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    return build_tiny_causal_lm(folder, texts, hidden_size=256, intermediate_size=768, num_hidden_layers=4), "tiny"


def naive_scores(model, items, batch_size: int, pad_id: int):
    """The straightforward implementation: data order, full-vocabulary fp32 log_softmax per batch."""
    import torch

    from creditflow.tasks.credit.contrastive import contrastive_rewards
    from creditflow.tasks.models.logprobs import naive_completion_logprobs

    device = next(model.parameters()).device
    sequences = [(kind, i) for i in range(len(items)) for kind in ("better_ids", "worse_ids", "plain_ids")]
    logps = {}
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        rows = [getattr(items[i], kind) + items[i].completion_ids for kind, i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        out = naive_completion_logprobs(
            model,
            input_ids,
            mask,
            [len(getattr(items[i], kind)) for kind, i in batch],
            [len(items[i].completion_ids) for _, i in batch],
        )
        logps.update(zip(batch, (lp.cpu() for lp in out)))
    return [
        (contrastive_rewards(logps["better_ids", i], logps["worse_ids", i]).numpy(), logps["plain_ids", i].numpy())
        for i in range(len(items))
    ]


def worker(args) -> None:
    """One path, one process: load, warm up on a few items, time the full set, report JSON on the last line."""
    import numpy as np
    import torch

    from creditflow.tasks.configs import TokenRewardsConfig
    from creditflow.tasks.credit import contrastive as T
    from creditflow.tasks.models.loading import load_tokenizer
    from creditflow.tasks.models.precision import inference_dtype, resolve_device
    from creditflow.tasks.models.tokenization import pad_token_id

    device = resolve_device(args.device)
    dtype = inference_dtype("auto", device)
    tokenizer = load_tokenizer(args.folder)
    pad_id = pad_token_id(tokenizer)
    config = TokenRewardsConfig(max_length=args.max_length, max_prompt_length=None)
    prompts, completions = load_pairs(args.pairs)
    items = T.encode_contrastive(tokenizer, prompts, completions, config)
    model = T.load_reference_model(args.folder, device, dtype)

    def run(subset):
        if args.path == "ours":
            return [(r.rewards, r.ref_logps) for r in T.score_contrastive(model, subset, args.batch_size, pad_id)]
        return naive_scores(model, subset, args.batch_size, pad_id)

    run(items[: args.batch_size])  # warm-up: allocator, kernels, thread pools
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    loaded_rss = status_mib("VmRSS")
    started = time.perf_counter()
    results = run(items)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    np.savez(args.out, *[a for pair in results for a in pair])
    report = {
        "path": args.path,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "sequences": 3 * len(items),
        "tokens": sum(item.n_forward_tokens for item in items),
        "seconds": seconds,
        "peak_rss_mib": status_mib("VmHWM"),
        "rss_growth_mib": status_mib("VmHWM") - loaded_rss,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 | tiny | a local folder")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="runs per path, alternating; medians are reported")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    parser.add_argument("--path", choices=["ours", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return worker(args)

    import numpy as np

    folder, name = model_folder(args.model)
    scratch = Path(tempfile.mkdtemp(prefix="bench-out-"))
    reports: dict[str, list[dict]] = {"ours": [], "naive": []}
    for _ in range(args.repeats):
        for path in ("ours", "naive"):
            command = [sys.executable, __file__, "--path", path, "--folder", str(folder), "--out", str(scratch / path)]
            command += ["--pairs", str(args.pairs), "--batch-size", str(args.batch_size)]
            command += ["--max-length", str(args.max_length), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{path} failed:\n{done.stderr[-4000:]}")
            reports[path].append(json.loads(done.stdout.strip().splitlines()[-1]))

    ours, naive = np.load(scratch / "ours.npz"), np.load(scratch / "naive.npz")
    diff = max(float(np.abs(ours[k] - naive[k]).max()) for k in ours.files)

    def median(path: str, field: str) -> float:
        return statistics.median(r[field] for r in reports[path])

    first = reports["ours"][0]
    memory = "cuda_peak_mib" if first["cuda_peak_mib"] is not None else "rss_growth_mib"
    if args.json:
        record = {"check": "token_rewards", "device": first["device"], "dtype": first["dtype"], "max_diff": diff}
        for path in ("ours", "naive"):
            record[f"{path}_tokens_per_s"] = round(median(path, "tokens") / median(path, "seconds"))
            record[f"{path}_peak_memory_mib"] = round(median(path, memory))
        record["speed_vs_naive"] = round(median("naive", "seconds") / median("ours", "seconds"), 3)
        record["memory_vs_naive"] = round(median("ours", memory) / max(median("naive", memory), 1e-9), 4)
        print(json.dumps(record))
        return
    print(
        f"model {name} ({folder}), {args.pairs} pairs = {first['sequences']} sequences, "
        f"{first['tokens']} tokens, batch {args.batch_size}, {first['device']} {first['dtype']}, "
        f"{args.repeats} runs per path (median)"
    )
    print(f"max |difference| of rewards and reference log-probs between paths: {diff:.2e}")
    print(f"{'path':6} {'tokens/s':>10} {'seconds':>8} {'peak RSS MiB':>13} {memory:>15}")
    for path in ("ours", "naive"):
        tps = median(path, "tokens") / median(path, "seconds")
        print(
            f"{path:6} {tps:10.0f} {median(path, 'seconds'):8.2f} "
            f"{median(path, 'peak_rss_mib'):13.0f} {median(path, memory):15.0f}"
        )
    speedup = median("naive", "seconds") / median("ours", "seconds")
    memory_ratio = median("naive", memory) / max(median("ours", memory), 1e-9)
    print(f"ours vs naive: {speedup:.2f}x tokens/s, {memory_ratio:.2f}x less {memory}")


if __name__ == "__main__":
    main()
