"""Benchmark: curation at scale. Rows/s and peak RSS of the streaming curation (tasks/recipes/curate.py) against
the in-memory path it replaced (bench/baselines/curate_in_memory.py), on synthetic HH-style preference rows in each
file format, at 10k, 100k and 1M rows; with the token-length rules; and on a local 2-worker Ray cluster.

Each measurement runs in a fresh Python process pinned to one core (``taskset``), so its peak RSS (VmHWM;
getrusage's peak would count the forked copy of this parent before the exec) is its own and its rows/s is one
core's; the "floor" row is a process that only imports curation (its RSS is what every run pays before the first
row). Ratios are ours / baseline at the same size and format, measured in this invocation.

    .venv/bin/python bench/curate_scale.py [--sizes 10000 100000 1000000] [--formats ...] [--large-formats ...]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from memory import status_mib  # bench/memory.py, beside this script

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("jsonl", "jsonl.gz", "parquet", "parquet-shards", "csv")
TOKENIZER = "smollm2"  # the length rules' tokenizer, and where the synthetic text's words come from


def english_words(limit: int = 20_000) -> list[str]:
    """Whole-word tokens of SmolLM2's vocabulary (space-prefixed, alphabetic): text that tokenizes like English."""
    from creditflow.tasks.models.loading import load_tokenizer
    from creditflow.tasks.models.resolve import resolve_model

    vocabulary = load_tokenizer(str(resolve_model(TOKENIZER))).get_vocab()
    words = sorted(t[1:] for t in vocabulary if t.startswith("Ġ") and t[1:].isalpha() and 3 <= len(t) <= 10)
    return words[:limit]


# ---------------------------------------------------------------------------------------------------------
# Data: HH-style rows (a human turn, two assistant answers), about 1.1 kB each, with 1% exact duplicates


def synthetic_rows(n: int, vocabulary: list[str], seed: int = 0):
    rng = random.Random(seed)
    previous = []
    for _ in range(n):
        if previous and rng.random() < 0.01:
            yield rng.choice(previous)
            continue
        prompt = " ".join(rng.choices(vocabulary, k=rng.randint(10, 60))) + "?"
        row = {
            "prompt": prompt,
            "chosen": " ".join(rng.choices(vocabulary, k=rng.randint(40, 120))) + ".",
            "rejected": " ".join(rng.choices(vocabulary, k=rng.randint(20, 100))) + ".",
        }
        if len(previous) < 1000:
            previous.append(row)
        yield row


def all_pairs_rows(n: int, vocabulary: list[str], seed: int = 1):
    """UltraFeedback's all-pairs form: each prompt's 4 answers in all 6 pairs (answers of 20-120 words)."""
    rng = random.Random(seed)
    made = 0
    while made < n:
        prompt = " ".join(rng.choices(vocabulary, k=rng.randint(10, 60))) + "?"
        answers = [" ".join(rng.choices(vocabulary, k=rng.randint(20, 120))) + "." for _ in range(4)]
        for i, j in itertools.combinations(range(4), 2):
            if made < n:
                yield {"prompt": prompt, "chosen": answers[i], "rejected": answers[j]}
                made += 1


def write_data(folder: Path, fmt: str, n: int, vocabulary: list[str]) -> Path:
    if fmt in ("jsonl", "jsonl.gz"):
        path = folder / f"rows-{n}.{fmt}"
        opener = gzip.open if fmt.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as handle:
            for row in synthetic_rows(n, vocabulary):
                handle.write(json.dumps(row) + "\n")
        return path
    if fmt == "csv":
        import csv

        path = folder / f"rows-{n}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(synthetic_rows(n, vocabulary))
        return path
    shards = 8 if fmt == "parquet-shards" else 1
    out = folder / f"rows-{n}-{fmt}"
    out.mkdir()
    per_shard = -(-n // shards)
    rows = synthetic_rows(n, vocabulary)
    for shard in range(shards):
        chunk = [row for _, row in zip(range(per_shard), rows)]
        pq.write_table(pa.Table.from_pylist(chunk), out / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return out if shards > 1 else out / "train-00000-of-00001.parquet"


# ---------------------------------------------------------------------------------------------------------
# One measurement, in its own process


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "bench" / "baselines"))
    from creditflow.tasks.config_base import ComputeConfig
    from creditflow.tasks.configs import CurateConfig, CurateRules, SourceConfig
    from creditflow.tasks.recipes.curate import curate_to

    if args.path is None:  # the floor: imports only
        print(json.dumps({"peak_rss_mb": status_mib("VmHWM")}))
        return
    rules = CurateRules(max_length=args.max_length) if args.max_length else CurateRules()
    config = CurateConfig(sources=[SourceConfig(path=args.path)], rules=rules, tokenizer=args.tokenizer)
    started = time.perf_counter()
    if args.path_kind == "baseline":
        import curate_in_memory

        result = curate_in_memory.curate(config, progress=False)
        rows, pairs = result.metrics["rows_in"], result.metrics["pairs_out"]
    else:
        compute = ComputeConfig(backend="ray", workers=2) if args.path_kind == "ray" else None
        with tempfile.TemporaryDirectory() as tmp:
            summary = curate_to(config, Path(tmp), progress=False, compute=compute)
        rows, pairs = summary.metrics["rows_in"], summary.metrics["pairs_out"]
    seconds = time.perf_counter() - started
    peak = status_mib("VmHWM")
    print(json.dumps({"rows": rows, "pairs": pairs, "seconds": seconds, "peak_rss_mb": peak}))


def measure(
    kind: str, path: Path | None, tokenizer: str | None = None, max_length: int | None = None, cores: str = "0"
) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--path", str(path) if path else ""]
    if tokenizer:
        command += ["--tokenizer", tokenizer, "--max-length", str(max_length)]
    if kind != "ray":  # one core unless told; Ray's workers get the machine's cores
        command = ["taskset", "-c", cores, *command]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} on {path} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "rows" in result:
        result["rows_per_s"] = result["rows"] / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--baseline-up-to", type=int, default=1_000_000, help="Largest size the baseline runs at.")
    parser.add_argument(
        "--large-formats", nargs="+", default=["jsonl", "parquet-shards"], help="The formats run at 1M rows and up."
    )
    parser.add_argument("--length-rules-size", type=int, default=50_000, help="Rows for the token-length run.")
    parser.add_argument("--ray-size", type=int, default=50_000, help="Rows for the Ray runs (Parquet shards).")
    parser.add_argument("--child", choices=["ours", "baseline", "ray", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.path_kind, args.path = args.child, args.path or None
        child(args)
        return

    print(f"curate_scale: sizes {args.sizes}, formats {args.formats}, {os.cpu_count()} cores", flush=True)
    floor = measure("floor", None)["peak_rss_mb"]
    print(f"import floor: peak RSS {floor:.0f} MB", flush=True)
    print("| format | rows | ours rows/s | ours peak RSS MB | baseline rows/s | baseline peak RSS MB | speed | RSS |")
    print("|---|---|---|---|---|---|---|---|")
    vocabulary = english_words()
    with tempfile.TemporaryDirectory(prefix="curate-scale-") as tmp:
        folder = Path(tmp)
        for n in args.sizes:
            for fmt in args.formats:
                if n >= 1_000_000 and fmt not in args.large_formats:
                    continue
                path = write_data(folder, fmt, n, vocabulary)
                ours = measure("ours", path)
                base = measure("baseline", path) if n <= args.baseline_up_to and fmt != "parquet-shards" else None
                cells = [fmt, f"{n:,}", f"{ours['rows_per_s']:,.0f}", f"{ours['peak_rss_mb']:,.0f}"]
                if base:
                    cells += [
                        f"{base['rows_per_s']:,.0f}",
                        f"{base['peak_rss_mb']:,.0f}",
                        f"{ours['rows_per_s'] / base['rows_per_s']:.2f}",
                        f"{ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}",
                    ]
                else:
                    cells += ["-", "-", "-", "-"]
                print("| " + " | ".join(cells) + " |", flush=True)
                _remove(path)

        if args.length_rules_size:
            length_rules(folder, args.length_rules_size, vocabulary)
        if args.ray_size:
            on_ray(folder, args.ray_size, vocabulary)


def length_rules(folder: Path, n: int, vocabulary: list[str]) -> None:
    """The token-length rules: the tokenizer is the cost (SmolLM2's, on the chat-templated prompt and each answer),
    on one pair per prompt and on UltraFeedback's all-pairs form (a prompt and its answers repeat over 6 pairs)."""
    path = write_data(folder, "jsonl", n, vocabulary)
    all_pairs = folder / f"all-pairs-{n}.jsonl"
    all_pairs.write_text("".join(json.dumps(row) + "\n" for row in all_pairs_rows(n, vocabulary)), encoding="utf-8")
    for label, data in (("one pair per prompt", path), ("all pairs of 4 answers per prompt", all_pairs)):
        ours, base = measure("ours", data, TOKENIZER, 512), measure("baseline", data, TOKENIZER, 512)
        print(
            f"\nwith token-length rules ({TOKENIZER}, max_length 512), {n:,} JSONL rows, {label}: ours "
            f"{ours['rows_per_s']:,.0f} rows/s, peak {ours['peak_rss_mb']:,.0f} MB; baseline "
            f"{base['rows_per_s']:,.0f} rows/s, peak {base['peak_rss_mb']:,.0f} MB; speed ratio "
            f"{ours['rows_per_s'] / base['rows_per_s']:.2f}",
            flush=True,
        )
        _remove(data)


def on_ray(folder: Path, n: int, vocabulary: list[str]) -> None:
    """Ray's case: checking that costs more than merging (the token-length rules), the same rows on a local 2-worker
    cluster (started in the child, start-up included) against ours on one core and against ours on both cores."""
    path = write_data(folder, "parquet-shards", n, vocabulary)
    one_core = measure("ours", path, TOKENIZER, 512)
    both_cores = measure("ours", path, TOKENIZER, 512, cores="0,1")
    distributed = measure("ray", path, TOKENIZER, 512)
    assert distributed["pairs"] == one_core["pairs"] == both_cores["pairs"], (distributed, one_core)
    print(
        f"Ray, 2 workers, {n:,} rows in 8 Parquet shards with the token-length rules: "
        f"{distributed['rows_per_s']:,.0f} rows/s (cluster start included); locally {one_core['rows_per_s']:,.0f} "
        f"on one core, {both_cores['rows_per_s']:,.0f} on two (the tokenizer's threads); ratio to one core "
        f"{distributed['rows_per_s'] / one_core['rows_per_s']:.2f}; driver peak RSS "
        f"{distributed['peak_rss_mb']:,.0f} MB",
        flush=True,
    )
    _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()


if __name__ == "__main__":
    main()
