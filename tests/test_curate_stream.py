"""Streaming curation: the same rows out as the in-memory path it replaced (kept frozen in bench/baselines), the
near-duplicate grouping of prompts and its rule, and decontamination against benchmark prompt files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from creditflow.tasks.configs import CurateConfig, CurateRules, SourceConfig
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.data.schema import ID_BYTES
from creditflow.tasks.data.similarity import NUM_PERM, NearDuplicateIndex, PromptSketch, words
from creditflow.tasks.models.tiny import build_tiny_tokenizer
from creditflow.tasks.recipes import curate as curate_module
from creditflow.tasks.recipes.curate import curate

BASELINE = Path(__file__).resolve().parents[1] / "bench" / "baselines" / "curate_in_memory.py"


def _in_memory():
    spec = importlib.util.spec_from_file_location("curate_in_memory", BASELINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(prompt, chosen, rejected, sc=None, sr=None):
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if sc is not None:
        row.update(score_chosen=sc, score_rejected=sr)
    return row


def _battery(n: int) -> list[dict]:
    """Rows that fire every rule, repeated so duplicates cross batch boundaries."""
    rows = []
    for i in range(n):
        rows += [
            _row(f"Question number {i} about the weather today?", f"A kind answer {i}.", "No.", 0.9, 0.1),
            _row(f"Q{i}?", "ok", "bad", "high", 0.1),  # schema
            _row(f"Q{i}?", "", "bad", 0.9, 0.1),  # empty
            _row(f"Q{i}?", "same", "same", 0.9, 0.1),  # identical
            _row(f"T{i}?", "a", "b", 0.3, 0.3),  # tie
            _row(f"M{i}?", "a", "b", 0.1, 0.3),  # margin
            _row(f"L{i}?", "word " * 80, "short", 0.9, 0.1),  # length, with the tokenizer's limits
        ]
    return rows + rows[: 3 * 7]  # exact duplicates of the first rows, far from them


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(out, ["Question number about the weather today? A kind answer. word short"] * 20, 300)
    return str(out)


def test_streaming_gives_the_same_rows_as_the_in_memory_path(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(curate_module, "BATCH_ROWS", 5)  # many batches: state must carry across them
    battery = _write_jsonl(tmp_path / "battery.jsonl", _battery(12))
    table = tmp_path / "battery.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in _battery(4) if isinstance(r.get("score_chosen"), float)]), table)
    configs = [
        CurateConfig(),  # the bundled sample
        CurateConfig(
            sources=[SourceConfig(path=str(battery)), SourceConfig(path=str(table)), SourceConfig(builtin="sample")],
            rules=CurateRules(strict_schema=False, max_response_tokens=40),
            tokenizer=tokenizer_dir,
            eval_fraction=0.3,
        ),
    ]
    reference = _in_memory()
    for config in configs:
        streamed, in_memory = curate(config, progress=False), reference.curate(config, progress=False)
        assert streamed.pairs.equals(in_memory.pairs)  # every column, the split included, in input order
        assert sorted(map(json.dumps, streamed.quarantine.to_pylist())) == sorted(
            map(json.dumps, in_memory.quarantine.to_pylist())
        )
        assert {k: v for k, v in streamed.metrics.items() if k in in_memory.metrics} == in_memory.metrics
        assert streamed.metrics["near_duplicate_groups"] == 0
    assert all(streamed.rule_counts[rule] for rule in ("schema", "empty", "identical", "duplicate", "tie", "margin"))
    assert streamed.rule_counts["length"]


def test_the_summary_histogram_counts_every_kept_pairs_length(tmp_path, monkeypatch):
    """The length histogram is built from per-length counts carried across batches, not a list of every length:
    the same bars as the lengths themselves would give."""
    monkeypatch.setattr(curate_module, "BATCH_ROWS", 7)
    summary = curate_module.curate_to(CurateConfig(), tmp_path, progress=False)
    pairs = pq.read_table(tmp_path / "pairs.parquet")
    figure = curate_module._summary_figure(summary)
    lengths = {side: curate_module._lengths(pairs, side) for side in ("chosen", "rejected")}
    edges = np.histogram_bin_edges(np.concatenate(list(lengths.values())), bins=30)  # both sides share the bins
    bars = figure.axes[1].containers  # one bar container per side, in the order chosen, rejected
    for (side, side_lengths), container in zip(lengths.items(), bars, strict=True):
        assert np.array_equal(summary.length_counts[side], np.bincount(side_lengths))
        expected, _ = np.histogram(side_lengths, bins=edges)
        assert [patch.get_height() for patch in container] == expected.tolist()


def test_minhash_estimates_the_jaccard_similarity_of_word_shingles():
    sketch = PromptSketch(0.8)
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(200)]

    def shingles(text):
        w = words(text)
        return {" ".join(w[i : i + 3]) for i in range(len(w) - 2)}

    errors = []
    for _ in range(200):
        a = list(rng.choice(vocabulary, 40))
        b = list(a)
        for j in rng.choice(40, int(rng.integers(0, 20)), replace=False):
            b[j] = str(rng.choice(vocabulary))
        first, second = " ".join(a), " ".join(b)
        exact = len(shingles(first) & shingles(second)) / len(shingles(first) | shingles(second))
        signatures = sketch.signatures(["short", first, "", second])  # batched with others: no leakage
        errors.append(np.mean(signatures[1] == signatures[3]) - exact)
    assert abs(np.mean(errors)) < 0.01 and np.std(errors) < 0.05  # unbiased; sd about sqrt(J(1-J)/128)
    same = sketch.signatures(["How do I bake bread?", "how do I bake  bread"])
    assert np.array_equal(same[0], same[1])  # case, punctuation and spacing do not count


NEAR = [
    "Can you explain how photosynthesis turns sunlight water and carbon dioxide into sugar in green plants?",
    "can you explain how photosynthesis turns sunlight, water and carbon dioxide into sugar in green plants",
    "Please, can you explain how photosynthesis turns sunlight water and carbon dioxide into sugar in green plants?",
]


def test_near_duplicate_prompts_always_share_a_split(tmp_path):
    others = [f"Write a short poem about the number {i} and the colour of the sea at dawn." for i in range(30)]
    rows = [_row(p, f"answer {i}", "no") for i, p in enumerate(NEAR + others)]
    path = _write_jsonl(tmp_path / "near.jsonl", rows)
    sides = set()
    for seed in range(20):
        config = CurateConfig(sources=[SourceConfig(path=str(path))], eval_fraction=0.5, split_seed=seed)
        result = curate(config, progress=False)
        splits = result.pairs.column("split").to_pylist()
        assert len(set(splits[:3])) == 1, seed  # never across the split
        sides.add(splits[0])
        assert result.metrics["near_duplicate_groups"] == 1 and result.metrics["pairs_out"] == len(rows)
    assert sides == {"train", "eval"}  # the group itself moves with the seed


def test_each_prompts_group_is_the_first_seen_member_of_its_near_duplicate_chain(tmp_path):
    chain = [  # each shares most 3-word shingles with the next only: one group through the chain
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho",
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi sigma",
        "beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi sigma",
    ]
    pair = [
        "one two three four five six seven eight nine ten eleven twelve",
        "one two three four five six seven eight nine ten eleven twelve thirteen",
    ]
    alone = [f"unrelated prompt number {i} about {word} and the sea at dawn" for i, word in enumerate("abcd")]
    # order of first sight: alone0, chain1, alone1, pair0, chain0, alone2, pair1, chain2, alone3
    prompts = [alone[0], chain[1], alone[1], pair[0], chain[0], alone[2], pair[1], chain[2], alone[3]]
    sketch = PromptSketch(0.7)
    index = NearDuplicateIndex(sketch, tmp_path / "signatures.bin")
    ids = [f"{i:0{2 * ID_BYTES}x}" for i in range(len(prompts))]
    for start in (0, 4):  # two batches
        assert index.add(ids[start : start + 5], sketch.signatures(prompts[start : start + 5])) == list(
            range(start, min(start + 5, len(prompts)))
        )
    with pytest.raises(RuntimeError, match=r"groups before seal\(\)"):
        index.groups()  # its files are still being written
    index.seal()
    assert index.groups().tolist() == [0, 1, 2, 3, 1, 5, 3, 1, 8]
    assert list(index.prompt_ids()) == ids
    with pytest.raises(RuntimeError, match=r"add after seal\(\)"):
        index.add(ids[:1], sketch.signatures(prompts[:1]))


@pytest.mark.parametrize("order", ["ABC", "ACB"])
def test_near_duplicates_in_one_bucket_link_whatever_lies_between_them(tmp_path, order):
    """A, B and C share band 0's key; A and C agree on most positions, B on few with either. Sorted by key, B can
    sit between A and C: they must still be compared."""
    sketch = PromptSketch(0.8)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2**32, (2, NUM_PERM), dtype=np.uint32)
    b[: sketch.rows] = a[: sketch.rows]  # band 0 alike, the rest unlike
    c = a.copy()
    c[np.arange(1, sketch.bands) * sketch.rows] ^= 1  # one position off in every other band: no other key shared
    assert np.mean(a == c) >= sketch.threshold > max(np.mean(a == b), np.mean(b == c))
    signatures = {"A": a, "B": b, "C": c}
    index = NearDuplicateIndex(sketch, tmp_path / "signatures.bin")
    index.add([f"{i:0{2 * ID_BYTES}x}" for i in range(3)], np.stack([signatures[name] for name in order]))
    index.seal()
    group = dict(zip(order, index.groups().tolist()))
    assert group == {"A": 0, "B": order.index("B"), "C": 0}


def test_a_bad_first_row_does_not_set_a_json_files_format(tmp_path):
    """JSON has no header: the keys most of the first rows share are the columns, so a first row without its
    prompt is the one row quarantined (or named), not the reason every row is read in another format."""
    rows = [{"chosen": "a", "rejected": "b"}] + [_row(f"Question {i}?", "yes", "no") for i in range(3)]
    path = _write_jsonl(tmp_path / "first_bad.jsonl", rows)
    lenient = CurateConfig(sources=[SourceConfig(path=str(path))], rules=CurateRules(strict_schema=False))
    result = curate(lenient, progress=False)
    assert result.pairs.column("source_row").to_pylist() == ["line 2", "line 3", "line 4"]
    assert [(q["source_row"], q["field"]) for q in result.quarantine.to_pylist()] == [("line 1", "prompt")]
    with pytest.raises(MalformedInputError, match=r"line 1.*prompt"):
        curate(CurateConfig(sources=[SourceConfig(path=str(path))]), progress=False)


def test_the_near_duplicate_rule_quarantines_later_copies_naming_the_kept_row(tmp_path):
    rows = [_row(NEAR[0], "a", "b"), _row("An unrelated question about trains?", "c", "d")]
    rows += [_row(NEAR[1], "e", "f"), _row(NEAR[0], "g", "h"), _row(NEAR[2], "i", "j")]
    path = _write_jsonl(tmp_path / "near.jsonl", rows)
    config = CurateConfig(sources=[SourceConfig(path=str(path))], rules=CurateRules(near_duplicates=True))
    result = curate(config, progress=False)
    assert result.pairs.column("source_row").to_pylist() == ["line 1", "line 2", "line 4"]  # the same prompt stays
    quarantined = result.quarantine.to_pylist()
    assert [(q["source_row"], q["rule"], q["field"]) for q in quarantined] == [
        ("line 3", "near_duplicate", "prompt"),
        ("line 5", "near_duplicate", "prompt"),
    ]
    assert all(q["reason"] == f"prompt is a near-duplicate of the prompt of {path} line 1" for q in quarantined)
    assert json.loads(quarantined[0]["raw"]) == rows[2]
    strict = CurateConfig(
        sources=[SourceConfig(path=str(path))],
        rules=CurateRules(near_duplicates=True, near_duplicate_threshold=0.95),
    )
    assert curate(strict, progress=False).rule_counts["near_duplicate"] == 1  # only the exact-words copy


def test_decontamination_quarantines_prompts_sharing_an_ngram_with_a_benchmark(tmp_path):
    alpaca = tmp_path / "alpaca_eval.json"  # AlpacaEval: a JSON list with an instruction field
    alpaca.write_text(
        json.dumps(
            [{"instruction": "What are the names of some famous actors that started their careers on Broadway?"}]
        )
    )
    mt_bench = tmp_path / "mt_bench.jsonl"  # MT-Bench: turns as strings
    mt_bench.write_text(
        json.dumps(
            {
                "question_id": 81,
                "turns": ["Compose an engaging travel blog post about a recent trip to Hawaii.", "Rewrite it."],
            }
        )
        + "\n"
    )
    arena = tmp_path / "arena_hard.jsonl"  # Arena-Hard: turns as messages
    arena.write_text(
        json.dumps({"turns": [{"content": "Use ABC notation to write a melody in the style of a folk tune."}]}) + "\n"
    )
    rows = [
        _row(
            "Quick quiz: what are the names of some famous actors that started their careers on Broadway? Thanks",
            "a",
            "b",
        ),
        _row("Compose an engaging travel blog post about a recent trip to Hawaii.", "c", "d"),  # under 13 words: whole
        _row("Use ABC notation to write a melody", "e", "f"),  # part of a short item: not the whole item
        _row("Name some actors who started on Broadway.", "g", "h"),  # shares words, no 13-gram
    ]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    config = CurateConfig(
        sources=[SourceConfig(path=str(path))], decontaminate=[str(alpaca), str(mt_bench), str(arena)]
    )
    result = curate(config, progress=False)
    quarantined = result.quarantine.to_pylist()
    assert [(q["source_row"], q["rule"]) for q in quarantined] == [
        ("line 1", "contaminated"),
        ("line 2", "contaminated"),
    ]
    assert quarantined[0]["reason"].startswith(
        f"prompt shares a 13-word n-gram with benchmark {alpaca} row 1: 'What are"
    )
    assert f"benchmark {mt_bench} line 1" in quarantined[1]["reason"]
    assert result.pairs.column("source_row").to_pylist() == ["line 3", "line 4"]
    shorter = config.model_copy(update={"decontaminate_ngram": 4})
    assert curate(shorter, progress=False).rule_counts["contaminated"] == 3  # 4-grams catch the melody too

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "fine"}) + "\n" + json.dumps({"output": "no prompt"}) + "\n")
    with pytest.raises(MalformedInputError, match=r"broken.jsonl: line 2: no benchmark prompt"):
        curate(config.model_copy(update={"decontaminate": [str(broken)]}), progress=False)
