"""Preference-data curation: ingest, validate, dedupe, filter and split by prompt, streaming in bounded memory.

Every row either lands in ``pairs`` or in ``quarantine`` with the rule that rejected it and why; the counts per
rule are stage metrics. Rules run in a fixed order and a row is charged to the first rule it fails:

    schema -> score -> empty -> contaminated -> identical -> duplicate -> tie -> margin -> length -> near_duplicate

``score`` quarantines NaN and infinite scores (a margin computed from them would be meaningless); ``empty`` counts
a turn that shows nothing (whitespace, zero-width and other invisible characters) as empty; ``contaminated``
(``decontaminate`` files) quarantines a prompt that shares a word n-gram with a benchmark prompt, naming the
benchmark item; ``near_duplicate`` (``rules.near_duplicates``) quarantines a row whose prompt near-duplicates an
earlier kept row's, naming that row (tasks/data/similarity.py has the MinHash-LSH test).

The train/eval split is by group of near-duplicate prompts (the same test, whether or not the rule quarantines),
so neither a prompt nor a near-duplicate of it appears on both sides. A group goes to eval when a seeded hash of
the id of its first-seen prompt falls below ``eval_fraction``: adding data moves no prompt to the other side unless
the new data joins it to an earlier one's group.

Streaming: rows are read, checked and written in batches of ``BATCH_ROWS``. What stays in memory per row is compact:
a 10-byte key and an int locating the first row of each pair (exact dedupe), and per distinct prompt its index and
LSH band keys. Passing pairs are staged on disk; a second pass over them writes the split.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from creditflow.storage.hashing import sha256_text
from creditflow.tasks.configs import CurateConfig, CurateRules, SourceConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.data.formats import MalformedInputError, RowProblem, check_columns, convert_row, detect_format
from creditflow.tasks.data.ingest import has_columns, read_rows, row_total, shard_rows, source_shards
from creditflow.tasks.data.key_map import CompactKeyMap, release_freed_memory
from creditflow.tasks.data.similarity import Contamination, NearDuplicateIndex, PromptSketch
from creditflow.tasks.infer.distributed import map_shards, uses_ray
from creditflow.tasks.models.loading import load_tokenizer
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.token_counts import TokenCounter
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.stage import StageContext

RULES = (
    "schema",
    "score",
    "empty",
    "contaminated",
    "identical",
    "duplicate",
    "tie",
    "margin",
    "length",
    "near_duplicate",
)
BATCH_ROWS = 2048
_RAW_MAX_CHARS = 20_000
_STAGED = pa.schema([*S.PAIRS_SCHEMA, ("prompt_index", pa.int64()), ("raw", pa.string())])


# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_curate(ctx: StageContext) -> dict[str, float]:
    """Stage entry point: curate into ``pairs`` and ``quarantine``, log rule counts and plots to MLflow."""
    trust = ctx.remote_code_allowed(ctx.config.tokenizer) if ctx.config.tokenizer else False  # the one model it loads
    summary = curate_to(ctx.config, ctx.writer.dir, ctx.progress, trust, ctx.compute)
    ctx.writer.adopt_table("pairs")
    ctx.writer.adopt_table("quarantine")
    ctx.run.log_figure(_summary_figure(summary), "curate/summary.png")
    if summary.rule_counts and sum(summary.rule_counts.values()):
        first = next(pq.ParquetFile(ctx.writer.dir / "quarantine.parquet").iter_batches(batch_size=200))
        ctx.run.log_rows(first.drop_columns(["raw"]).to_pylist(), "curate/quarantine_sample.json")
    return summary.metrics


@dataclass
class CurationSummary:
    metrics: dict[str, float]
    rule_counts: dict[str, int]
    # How many kept pairs have each response length (index = length, in tokens, or characters without a
    # tokenizer): what the summary histogram needs, in memory that grows with the longest response, not the rows.
    length_counts: dict[str, np.ndarray] = field(
        default_factory=lambda: {side: np.zeros(0, np.int64) for side in S.SIDES}
    )
    length_unit: str = "characters"


@dataclass
class CurationResult:
    """Curation's outputs in memory (:func:`curate`): for tests and small data; the stage streams to disk."""

    pairs: pa.Table
    quarantine: pa.Table
    metrics: dict[str, float]
    rule_counts: dict[str, int]


def curate(
    config: CurateConfig, progress: bool = True, trust_remote_code: bool = False, compute=None
) -> CurationResult:
    with tempfile.TemporaryDirectory(prefix="creditflow-curate-") as tmp:
        summary = curate_to(config, Path(tmp), progress, trust_remote_code, compute)
        pairs, quarantine = pq.read_table(Path(tmp) / "pairs.parquet"), pq.read_table(Path(tmp) / "quarantine.parquet")
    return CurationResult(pairs, quarantine, summary.metrics, summary.rule_counts)


# ---------------------------------------------------------------------------------------------------------
# Rows, one source at a time: the row-local rules


@dataclass
class Rejection:
    rule: str
    reason: str
    field: str | None = None


@dataclass
class Checked:
    """One row after the row-local rules: rejected before dedupe (``record`` None), or a pair record with the
    rule it fails after dedupe (tie, margin, length), if any."""

    location: str
    raw: Any
    record: dict[str, Any] | None
    rejection: Rejection | None = None
    pair_id: str | None = None  # known from the identical rule on
    signature: np.ndarray | None = None  # the prompt's MinHash signature, for a pair that passes


@dataclass
class _Tools:
    """What the row rules need besides the rows: the token counter (length rules), the benchmark n-grams and the
    prompt sketcher."""

    token_counter: TokenCounter | None
    contamination: Contamination | None
    sketch: PromptSketch
    trust_remote_code: bool = False

    @classmethod
    def build(cls, config: CurateConfig, trust_remote_code: bool) -> "_Tools":
        token_counter = (
            TokenCounter(load_tokenizer(str(resolve_model(config.tokenizer)), trust_remote_code))
            if config.tokenizer
            else None
        )
        contamination = (
            Contamination(config.decontaminate, config.decontaminate_ngram) if config.decontaminate else None
        )
        return cls(token_counter, contamination, PromptSketch(config.rules.near_duplicate_threshold), trust_remote_code)


class RowChecker:
    """Every rule that looks at one row, on batches of one source's rows."""

    def __init__(self, config: CurateConfig, fmt: str, label: str, tools: _Tools):
        self.rules, self.fmt, self.label = config.rules, fmt, label
        self.token_counter, self.contamination, self.sketch = tools.token_counter, tools.contamination, tools.sketch

    def check_batch(self, rows: list[tuple[str, dict[str, Any]]]) -> list[Checked]:
        checked = [self._check(location, row) for location, row in rows]
        passing = [c for c in checked if c.record is not None and c.rejection is None]
        if self.token_counter is not None and passing:
            self._apply_length_rules(self.token_counter, passing)
        kept = [c for c in passing if c.rejection is None]
        prompts = {c.record["prompt_id"]: c.record["prompt"] for c in kept}
        signatures = dict(zip(prompts, self.sketch.signatures([S.completion_text(p) for p in prompts.values()])))
        for c in kept:
            c.signature = signatures[c.record["prompt_id"]]
        return checked

    def _check(self, location: str, row: dict[str, Any]) -> Checked:
        """One function on purpose: the rules run in the documented order and a row is charged to the first it
        fails, which reads best top to bottom."""
        rules = self.rules
        try:
            prompt, chosen, rejected, score_c, score_r = convert_row(self.fmt, row)
        except RowProblem as problem:
            if rules.strict_schema:
                raise MalformedInputError(
                    self.label,
                    location,
                    problem.field,
                    f"{problem} (set curate.rules.strict_schema: false to quarantine such rows)",
                ) from None
            return Checked(location, row, None, Rejection("schema", str(problem), problem.field))

        for name, score in (("score_chosen", score_c), ("score_rejected", score_r)):
            if score is not None and not math.isfinite(score):
                return Checked(location, row, None, Rejection("score", f"{name} is {score}", name))

        if rules.drop_empty:
            for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                blank = next((i for i, m in enumerate(messages) if S.is_blank(m["content"])), None)
                if blank is not None:
                    reason = (
                        f"{name} turn {blank} ({messages[blank]['role']}) is empty, whitespace or invisible characters"
                    )
                    return Checked(location, row, None, Rejection("empty", reason, name))

        if self.contamination is not None:
            item = self.contamination.match(S.completion_text(prompt))
            if item is not None:
                reason = (
                    f"prompt shares a {self.contamination.n}-word n-gram with benchmark {item.file} {item.location}: "
                    f"{item.text[:80]!r}"
                )
                return Checked(location, row, None, Rejection("contaminated", reason, "prompt"))

        pid, prompt_key, identical = S.pair_keys(prompt, chosen, rejected)
        if rules.drop_identical and identical:
            reason = "chosen and rejected are identical after whitespace normalization"
            return Checked(location, row, None, Rejection("identical", reason), pid)

        margin = score_c - score_r if score_c is not None and score_r is not None else None
        record = {
            "pair_id": pid,
            "prompt_id": prompt_key,
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "score_chosen": score_c,
            "score_rejected": score_r,
            "margin": margin,
            "prompt_tokens": None,
            "chosen_tokens": None,
            "rejected_tokens": None,
            "source": self.label,
            "source_row": location,
            "split": None,
        }
        late = None
        if margin is not None:
            if rules.drop_ties and margin == 0:
                late = Rejection("tie", f"score_chosen == score_rejected == {score_c}")
            elif rules.min_margin is not None and margin < rules.min_margin:
                late = Rejection("margin", f"margin {margin:.4g} < min_margin {rules.min_margin}")
        return Checked(location, row, record, late)

    def _apply_length_rules(self, counter: TokenCounter, passing: list[Checked]) -> None:
        records = [c.record for c in passing]
        prompts = _token_counts(counter.prompt_lengths, [r["prompt"] for r in records])
        answers = _token_counts(
            counter.completion_lengths, [r["chosen"] for r in records] + [r["rejected"] for r in records]
        )
        for c, p, ch, rj in zip(passing, prompts, answers[: len(records)], answers[len(records) :], strict=True):
            c.record.update(prompt_tokens=p, chosen_tokens=ch, rejected_tokens=rj)
            violation = _length_violation(p, ch, rj, self.rules)
            if violation:
                c.rejection = Rejection("length", violation[1], violation[0])


def _token_counts(lengths_of: Callable[[list[S.Messages]], list[int]], items: list[S.Messages]) -> list[int]:
    """Token count of each message list, each distinct one counted once: a prompt with several pairs repeats itself
    and its answers (UltraFeedback's all-pairs form has 6 pairs of 4 answers), and the tokenizer is the cost."""
    distinct: dict[tuple, int] = {}
    slots = [distinct.setdefault(S.exact_key(item), len(distinct)) for item in items]
    firsts = list({slot: item for slot, item in zip(slots, items)}.values())
    lengths = lengths_of(firsts)
    return [lengths[slot] for slot in slots]


# ---------------------------------------------------------------------------------------------------------
# The run: stream every source through the checker, dedupe, stage; then split


class _Quarantine:
    """The quarantine table, written as it grows."""

    def __init__(self, path: Path):
        self.writer = pq.ParquetWriter(path, S.QUARANTINE_SCHEMA, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def add(self, source: str, location: str, rejection: Rejection, raw: Any, pair_id: str | None = None) -> None:
        self.counts[rejection.rule] += 1
        text = raw if isinstance(raw, str) else _raw_text(raw)
        self.rows.append(
            {
                "source": source,
                "source_row": location,
                "rule": rejection.rule,
                "field": rejection.field,
                "reason": rejection.reason,
                "pair_id": pair_id,
                "raw": text,
            }
        )
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_table(S.rows_to_table(self.rows, S.QUARANTINE_SCHEMA))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _raw_text(raw: Any) -> str:
    text = json.dumps(raw, ensure_ascii=False, default=str)
    # Keep rows whose text cannot be stored as UTF-8 (lone surrogates), escaped, rather than fail the stage.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:_RAW_MAX_CHARS]


def curate_to(
    config: CurateConfig, folder: Path, progress: bool = True, trust_remote_code: bool = False, compute=None
) -> CurationSummary:
    """Curate ``config``'s sources into ``folder``: pairs.parquet and quarantine.parquet."""
    tools = _Tools.build(config, trust_remote_code)
    quarantine = _Quarantine(folder / "quarantine.parquet")
    with tempfile.TemporaryDirectory(prefix="curate-stage-", dir=folder) as tmp:
        staged_path = Path(tmp) / "staged.parquet"
        prompts = NearDuplicateIndex(tools.sketch, Path(tmp) / "signatures.bin")
        rows_in = _stage(config, tools, progress, compute, quarantine, prompts, staged_path)
        prompts.seal()
        release_freed_memory()  # both key maps are gone: the split pass gets their memory
        summary = _split_and_write(staged_path, prompts, config, folder, quarantine)
    quarantine.close()
    summary.metrics["rows_in"] = rows_in
    summary.length_unit = "tokens" if tools.token_counter is not None else "characters"
    return summary


def _stage(
    config: CurateConfig,
    tools: _Tools,
    progress: bool,
    compute,
    quarantine: _Quarantine,
    prompts: NearDuplicateIndex,
    staged_path: Path,
) -> int:
    """Pass 1: every source's rows checked, deduped and staged to ``staged_path``; returns the rows read. The exact
    dedupe state lives and dies here, before the split pass allocates its per-prompt arrays."""
    # A scratch file, read back one row group at a time: fast, not small, and no column statistics (their min/max
    # texts stay in the writer's memory for every row group until it closes).
    staged = pq.ParquetWriter(staged_path, _STAGED, compression="lz4", write_statistics=False)
    seen = _FirstSeen()
    rows_in = 0
    for source in config.sources:

        def consume(checked: list[Checked], label: str = source.label) -> None:
            nonlocal rows_in
            rows_in += len(checked)
            records = _dedupe(checked, label, config.rules, seen, quarantine)
            if records:
                signatures = np.stack([signature for _, signature in records])
                indices = prompts.add([record["prompt_id"] for record, _ in records], signatures)
                for (record, _), index in zip(records, indices):
                    record["prompt_index"] = index
                staged.write_table(pa.Table.from_pylist([record for record, _ in records], schema=_STAGED))

        _check_source(source, config, tools, progress, compute, consume)
    staged.close()
    return rows_in


def _check_source(
    source: SourceConfig, config: CurateConfig, tools: _Tools, progress: bool, compute, consume: Callable
) -> None:
    """Run every row of ``source`` through the row-local rules and hand each checked batch to ``consume``, in input
    order. On Ray (``compute.backend: ray``), each file of the source is read and checked on a worker; results
    come back as workers finish and are consumed in file order, so the output is the local run's."""
    columns, rows = read_rows(source)
    fmt = (
        source.format if source.format != "auto" else (detect_format(columns, source.label) if columns else "explicit")
    )
    table_columns = columns if has_columns(source) else None
    if table_columns is not None:
        check_columns(fmt, table_columns, source.label)
    shards = source_shards(source)
    bar = tqdm(desc=f"curate {source.label}", total=row_total(source), unit=" rows", disable=not progress)
    with bar:
        if uses_ray(compute) and shards is not None and source.limit is None:
            finished: dict[int, list[Checked]] = {}
            following = 0

            def write(index: int, checked: list[Checked]) -> None:
                nonlocal following
                finished[index] = checked
                bar.update(len(checked))
                while following in finished:
                    consume(finished.pop(following))
                    following += 1

            build = partial(ShardChecker, config, fmt, source.label, table_columns, tools.trust_remote_code)
            map_shards([(str(path), prefix) for path, prefix in shards], build, compute, write)
            return
        checker = RowChecker(config, fmt, source.label, tools)
        while batch := list(islice(rows, BATCH_ROWS)):
            consume(checker.check_batch(batch))
            bar.update(len(batch))


class ShardChecker:
    """A Ray worker's checker: reads one file of a source and checks all its rows (built on the worker)."""

    def __init__(self, config: CurateConfig, fmt: str, label: str, columns, trust_remote_code: bool):
        self.label, self.columns = label, columns
        self.checker = RowChecker(config, fmt, label, _Tools.build(config, trust_remote_code))

    def __call__(self, shard: tuple[str, str]) -> list[Checked]:
        path, prefix = shard
        rows = shard_rows(Path(path), prefix, self.label, self.columns)[1]
        checked: list[Checked] = []
        while batch := list(islice(rows, BATCH_ROWS)):
            checked += self.checker.check_batch(batch)
        return checked


class _FirstSeen:
    """Where each pair was first seen, compactly: a pair id's 10 bytes to one int64 packing an interned location
    prefix (source and shard) and the line or row number (tasks/data/key_map.py), not a location string per pair."""

    def __init__(self) -> None:
        self.codes = CompactKeyMap(S.ID_BYTES)
        self.prefixes: list[str] = []
        self._prefix_ids: dict[str, int] = {}

    def check(self, pair_ids: list[str], label: str, locations: list[str]) -> list[str | None]:
        """Where each pair was first seen, earlier in this batch included, or None: then it is recorded as seen at
        its location."""
        keys = [bytes.fromhex(pair_id) for pair_id in pair_ids]
        codes, new_rows = self.codes.setdefault_many(keys, lambda row, _: self._code(label, locations[row]))
        new = set(new_rows)
        return [
            None if row in new else f"{self.prefixes[code >> 40]}{code & (2**40 - 1)}" for row, code in enumerate(codes)
        ]

    def _code(self, label: str, location: str) -> int:
        head, _, number = location.rpartition(" ")  # "[shard ]line 17", "row 17"
        prefix = f"{label} {head} "
        prefix_id = self._prefix_ids.setdefault(prefix, len(self.prefixes))
        if prefix_id == len(self.prefixes):
            self.prefixes.append(prefix)
        return prefix_id << 40 | int(number)


def _dedupe(
    checked: list[Checked], label: str, rules: CurateRules, seen: _FirstSeen, quarantine: _Quarantine
) -> list[tuple[dict[str, Any], np.ndarray]]:
    """The batch's pairs that pass every rule so far (records and prompt signatures); the rest quarantined, in the
    documented order: a duplicate is charged as one before its own tie, margin or length problem."""
    valid = [c for c in checked if c.record is not None]
    firsts = iter(
        seen.check([c.record["pair_id"] for c in valid], label, [c.location for c in valid])
        if rules.dedupe
        else [None] * len(valid)
    )
    passed = []
    for c in checked:
        record = c.record
        if record is None:
            assert c.rejection is not None
            quarantine.add(label, c.location, c.rejection, c.raw, c.pair_id)
            continue
        first = next(firsts)
        if first is not None:
            quarantine.add(label, c.location, Rejection("duplicate", f"duplicate of {first}"), c.raw, record["pair_id"])
            continue
        if c.rejection is not None:
            quarantine.add(label, c.location, c.rejection, c.raw, record["pair_id"])
            continue
        record["raw"] = _raw_text(c.raw) if rules.near_duplicates else None  # quarantined later only under that rule
        passed.append((record, c.signature))
    return passed


def _split_and_write(
    staged_path: Path, prompts: NearDuplicateIndex, config: CurateConfig, folder: Path, quarantine: _Quarantine
) -> CurationSummary:
    """Second pass: each prompt's group decides its split; under ``near_duplicates`` a row whose prompt is not its
    group's first is quarantined, naming the row that kept the group's first prompt."""
    group = prompts.groups()
    n = len(group)
    # Per prompt, this pass keeps its group and three flags (11 bytes): its peak at tens of millions of rows.
    is_first = group == np.arange(n)
    firsts = np.flatnonzero(is_first)
    ids = prompts.prompt_ids()
    units = np.fromiter(  # a group's split unit is its first prompt's
        (split_unit(key, config.split_seed) for key, first in zip(ids, is_first) if first), np.float64, len(firsts)
    )
    eval_group = np.zeros(n, dtype=bool)
    eval_group[firsts] = units < config.eval_fraction
    if config.eval_fraction > 0 and not eval_group.any() and len(firsts) >= 2:
        eval_group[firsts[np.argmin(units)]] = True  # tiny sets: still hold out one group
    shared = np.zeros(n, dtype=bool)  # the first prompt of a group of several
    shared[group[~is_first]] = True
    del is_first, units
    kept_prompts = np.zeros(n, dtype=bool)
    pairs_out = eval_pairs = 0
    summary = CurationSummary({}, {})
    kept_at: dict[int, str] = {}  # first prompt of a group of several -> the row that kept it (near_duplicate names it)
    columns = [name for name in S.PAIRS_SCHEMA.names if name != "split"]
    with pq.ParquetWriter(folder / "pairs.parquet", S.PAIRS_SCHEMA, compression="zstd") as out:
        staged = pq.ParquetFile(staged_path)
        for group_index in range(staged.num_row_groups):  # one row group (one pass-1 batch) in memory at a time
            batch = staged.read_row_group(group_index).combine_chunks().to_batches()[0]
            index = batch.column("prompt_index").to_numpy()
            first = group[index]
            for row in np.flatnonzero((index == first) & shared[first]):
                kept_at.setdefault(int(first[row]), _where(batch, row))
            keep = np.ones(len(index), dtype=bool)
            if config.rules.near_duplicates:
                keep = index == first
                for row in np.flatnonzero(~keep):
                    reason = f"prompt is a near-duplicate of the prompt of {kept_at[int(first[row])]}"
                    where = batch.column("source_row")[row].as_py()
                    quarantine.add(
                        batch.column("source")[row].as_py(),
                        where,
                        Rejection("near_duplicate", reason, "prompt"),
                        batch.column("raw")[row].as_py(),
                        batch.column("pair_id")[row].as_py(),
                    )
            split = pa.array(np.where(eval_group[first], "eval", "train"))
            table = pa.Table.from_batches([batch]).select(columns).append_column("split", split).filter(keep)
            out.write_table(table.cast(S.PAIRS_SCHEMA))
            kept_prompts[index[keep]] = True
            pairs_out += int(keep.sum())
            eval_pairs += int(eval_group[first][keep].sum())
            for side, counts in summary.length_counts.items():
                summary.length_counts[side] = _add_counts(counts, _lengths(table, side))
    eval_prompts = int(np.sum(kept_prompts & eval_group[group])) if n else 0
    rule_counts = {rule: quarantine.counts.get(rule, 0) for rule in RULES}
    summary.rule_counts = rule_counts
    summary.metrics = {
        "pairs_out": pairs_out,
        "quarantined": sum(rule_counts.values()),
        "train_pairs": pairs_out - eval_pairs,
        "eval_pairs": eval_pairs,
        "train_prompts": int(kept_prompts.sum()) - eval_prompts,
        "eval_prompts": eval_prompts,
        "near_duplicate_groups": int(shared.sum()),
        **{f"quarantined.{rule}": count for rule, count in rule_counts.items()},
    }
    return summary


def _length_violation(prompt: int, chosen: int, rejected: int, rules: CurateRules) -> tuple[str, str] | None:
    if rules.max_prompt_tokens is not None and prompt > rules.max_prompt_tokens:
        return "prompt", f"prompt has {prompt} tokens > max_prompt_tokens {rules.max_prompt_tokens}"
    if rules.max_response_tokens is not None:
        for name, n in (("chosen", chosen), ("rejected", rejected)):
            if n > rules.max_response_tokens:
                return name, f"{name} has {n} tokens > max_response_tokens {rules.max_response_tokens}"
    if rules.max_length is not None and prompt + max(chosen, rejected) > rules.max_length:
        return "prompt", f"prompt + response is {prompt + max(chosen, rejected)} tokens > max_length {rules.max_length}"
    return None


def split_unit(prompt_id: str, seed: int) -> float:
    """Deterministic uniform number in [0, 1) for a prompt id."""
    return int(sha256_text(f"{seed}:{prompt_id}")[:15], 16) / 16**15


def _where(batch: pa.RecordBatch, row: int) -> str:
    return f"{batch.column('source')[row].as_py()} {batch.column('source_row')[row].as_py()}"


def _lengths(pairs: pa.Table, side: str) -> np.ndarray:
    """Each pair's ``side`` length: its token count, or its characters without a tokenizer."""
    tokens = pairs.column(f"{side}_tokens")
    if tokens.null_count == 0:
        return tokens.to_numpy().astype(np.int32)
    messages = pairs.column(side).combine_chunks()
    chars = pc.utf8_length(pc.struct_field(pc.list_flatten(messages), "content")).to_numpy()
    per_pair = np.bincount(pc.list_parent_indices(messages).to_numpy(), weights=chars, minlength=len(messages))
    turns = pc.list_value_length(messages).to_numpy()
    return (per_pair + np.maximum(turns - 1, 0)).astype(np.int32)  # completion_text joins turns with newlines


def _add_counts(counts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    total = np.bincount(lengths, minlength=len(counts))
    total[: len(counts)] += counts
    return total


def _summary_figure(summary: CurationSummary):
    fig, (left, right) = new_figure(2, (10, 3.5))
    rules, counts = zip(*summary.rule_counts.items())
    left.barh(rules, counts, color="#c0504d")
    left.set_title(f"quarantined rows by rule ({sum(counts)} of {int(summary.metrics['rows_in'])})")
    left.invert_yaxis()
    sides = summary.length_counts.values()
    right.hist(  # each distinct length once, weighted by its count: the histogram of every pair's length
        [np.flatnonzero(counts) for counts in sides],
        weights=[counts[counts > 0] for counts in sides],
        bins=30,
        label=["chosen", "rejected"],
        color=["#4f81bd", "#f79646"],
    )
    right.set_title(f"response length ({summary.length_unit})")
    right.legend(loc="upper right")
    return finish(fig)
