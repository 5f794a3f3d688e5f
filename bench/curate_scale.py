"""Benchmark: curation at scale. Rows/s and peak RSS of the streaming curation (tasks/recipes/curate.py) against
the in-memory path it replaced (bench/baselines/curate_in_memory.py), on synthetic HH-style preference rows in each
file format, at 10k, 100k and 1M rows; with the token-length rules; and on a local 2-worker Ray cluster.

Each measurement runs in a fresh Python process pinned to one core (``taskset``), so its peak RSS (getrusage)
is its own and its rows/s is one core's; the "floor" row is a process that only imports curation (its RSS is
what every run pays before the first row). Ratios are ours / baseline at the same size and format, measured in
this invocation.

    .venv/bin/python bench/curate_scale.py [--sizes 10000 100000 1000000] [--formats jsonl jsonl.gz parquet csv]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("jsonl", "jsonl.gz", "parquet", "parquet-shards", "csv")
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by not "
    "but what some we can out other were all there when up use your how said an each she which do their time if "
    "will way about many then them write would like so these her long make thing see him two has look more day"
).split()


# ---------------------------------------------------------------------------------------------------------
# Data: HH-style rows (a human turn, two assistant answers), about 1.1 kB each, with 1% exact duplicates


def synthetic_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    vocabulary = WORDS + [f"w{i}" for i in range(20_000)]
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


def write_data(folder: Path, fmt: str, n: int) -> Path:
    if fmt in ("jsonl", "jsonl.gz"):
        path = folder / f"rows-{n}.{fmt}"
        opener = gzip.open if fmt.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as handle:
            for row in synthetic_rows(n):
                handle.write(json.dumps(row) + "\n")
        return path
    if fmt == "csv":
        import csv

        path = folder / f"rows-{n}.csv"
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, ["prompt", "chosen", "rejected"])
            writer.writeheader()
            writer.writerows(synthetic_rows(n))
        return path
    shards = 8 if fmt == "parquet-shards" else 1
    out = folder / f"rows-{n}-{fmt}"
    out.mkdir()
    per_shard = -(-n // shards)
    rows = synthetic_rows(n)
    for shard in range(shards):
        chunk = [row for _, row in zip(range(per_shard), rows)]
        pq.write_table(pa.Table.from_pylist(chunk), out / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return out if shards > 1 else out / "train-00000-of-00001.parquet"


# ---------------------------------------------------------------------------------------------------------
# One measurement, in its own process


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "bench" / "baselines"))
    from creditflow.tasks.configs import ComputeConfig, CurateConfig, CurateRules, SourceConfig
    from creditflow.tasks.recipes.curate import curate_to

    if args.path is None:  # the floor: imports only
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "pairs": pairs, "seconds": seconds, "peak_rss_mb": peak}))


def measure(kind: str, path: Path | None, tokenizer: str | None = None, max_length: int | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--path", str(path) if path else ""]
    if tokenizer:
        command += ["--tokenizer", tokenizer, "--max-length", str(max_length)]
    if kind != "ray":  # one core; Ray's workers get the machine's cores
        command = ["taskset", "-c", "0", *command]
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
    parser.add_argument("--length-rules-size", type=int, default=100_000, help="Rows for the token-length run.")
    parser.add_argument("--ray-size", type=int, default=100_000, help="Rows for the Ray run (Parquet shards).")
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
    with tempfile.TemporaryDirectory(prefix="curate-scale-") as tmp:
        folder = Path(tmp)
        for n in args.sizes:
            for fmt in args.formats:
                path = write_data(folder, fmt, n)
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

        # Token-length rules: the tokenizer is the cost (a tiny BPE trained on the synthetic words)
        from creditflow.tasks.models.tiny import build_tiny_tokenizer

        tokenizer = folder / "tokenizer"
        build_tiny_tokenizer(tokenizer, [" ".join(WORDS)] * 50, vocab_size=2000)
        path = write_data(folder, "jsonl", args.length_rules_size)
        ours = measure("ours", path, str(tokenizer), 512)
        base = measure("baseline", path, str(tokenizer), 512)
        print(
            f"\nwith token-length rules (max_length 512), {args.length_rules_size:,} JSONL rows: ours "
            f"{ours['rows_per_s']:,.0f} rows/s, peak {ours['peak_rss_mb']:,.0f} MB; baseline {base['rows_per_s']:,.0f} "
            f"rows/s, peak {base['peak_rss_mb']:,.0f} MB; speed ratio {ours['rows_per_s'] / base['rows_per_s']:.2f}",
            flush=True,
        )
        _remove(path)

        # Ray: the same rows on a local 2-worker cluster (started in the child), against ours on one core
        path = write_data(folder, "parquet-shards", args.ray_size)
        local, on_ray = measure("ours", path), measure("ray", path)
        assert on_ray["pairs"] == local["pairs"], (on_ray, local)
        print(
            f"Ray, 2 workers, {args.ray_size:,} rows in 8 Parquet shards: {on_ray['rows_per_s']:,.0f} rows/s (cluster "
            f"start included) against {local['rows_per_s']:,.0f} on one core locally: ratio "
            f"{on_ray['rows_per_s'] / local['rows_per_s']:.2f}; driver peak RSS {on_ray['peak_rss_mb']:,.0f} MB",
            flush=True,
        )


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()


if __name__ == "__main__":
    main()
