"""Curation as main had it before streaming (tasks/recipes/curate.py at d048018), kept frozen: every row, candidate
and seen key in memory, the split by prompt id alone. It is bench/curate_scale.py's baseline and the reference
tests/test_curate_stream.py compares the streaming path with (same rows out). Not used by the pipeline."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from creditflow.storage.hashing import sha256_text
from creditflow.tasks.configs import CurateConfig, CurateRules, SourceConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.data.formats import MalformedInputError, RowProblem, check_columns, convert_row, detect_format
from creditflow.tasks.data.ingest import has_columns, read_rows, row_total
from creditflow.tasks.models.loading import load_tokenizer
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.tokenization import encode_completions, encode_prompts

RULES = ("schema", "score", "empty", "identical", "duplicate", "tie", "margin", "length")
_RAW_MAX_CHARS = 20_000


@dataclass
class CurationResult:
    pairs: pa.Table
    quarantine: pa.Table
    metrics: dict[str, float]
    rule_counts: dict[str, int]


class _Quarantine:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def add(
        self,
        rule: str,
        reason: str,
        source: str,
        location: str,
        raw: Any,
        field: str | None = None,
        pair_id: str | None = None,
    ) -> None:
        self.counts[rule] += 1
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        # Keep rows whose text cannot be stored as UTF-8 (lone surrogates), escaped, rather than fail the stage.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        self.rows.append(
            {
                "source": source,
                "source_row": location,
                "rule": rule,
                "field": field,
                "reason": reason,
                "pair_id": pair_id,
                "raw": text[:_RAW_MAX_CHARS],
            }
        )


def curate(config: CurateConfig, progress: bool = True, trust_remote_code: bool = False) -> CurationResult:
    quarantine = _Quarantine()
    candidates: list[dict[str, Any]] = []
    raw_by_key: dict[int, Any] = {}
    seen: dict[str, str] = {}
    rows_in = 0
    for source in config.sources:
        columns, rows = read_rows(source)
        fmt = (
            source.format
            if source.format != "auto"
            else (detect_format(columns, source.label) if columns else "explicit")
        )
        if has_columns(source):
            check_columns(fmt, columns, source.label)
        bar = tqdm(rows, desc=f"curate {source.label}", total=row_total(source), unit=" rows", disable=not progress)
        for location, row in bar:
            rows_in += 1
            record = _validate(fmt, row, source, location, config.rules, quarantine, seen)
            if record is not None:
                raw_by_key[len(candidates)] = row
                candidates.append(record)

    if config.tokenizer and candidates:
        _apply_length_rules(candidates, raw_by_key, config, quarantine, trust_remote_code)
    pairs = [c for c in candidates if not c.pop("_rejected", False)]
    _assign_splits(pairs, config.eval_fraction, config.split_seed)

    rule_counts = {rule: quarantine.counts.get(rule, 0) for rule in RULES}
    split_counts = Counter(p["split"] for p in pairs)
    metrics: dict[str, float] = {
        "rows_in": rows_in,
        "pairs_out": len(pairs),
        "quarantined": sum(rule_counts.values()),
        "train_pairs": split_counts.get("train", 0),
        "eval_pairs": split_counts.get("eval", 0),
        "train_prompts": len({p["prompt_id"] for p in pairs if p["split"] == "train"}),
        "eval_prompts": len({p["prompt_id"] for p in pairs if p["split"] == "eval"}),
        **{f"quarantined.{rule}": n for rule, n in rule_counts.items()},
    }
    return CurationResult(
        pairs=S.rows_to_table(pairs, S.PAIRS_SCHEMA),
        quarantine=S.rows_to_table(quarantine.rows, S.QUARANTINE_SCHEMA),
        metrics=metrics,
        rule_counts=rule_counts,
    )


def _validate(
    fmt: str,
    row: dict[str, Any],
    source: SourceConfig,
    location: str,
    rules: CurateRules,
    quarantine: _Quarantine,
    seen: dict[str, str],
) -> dict[str, Any] | None:
    """Canonical record for a row that passes the row-local rules, else None (and the row is quarantined).

    One function on purpose: the rules run in the documented order and a row is charged to the first it fails,
    which reads best top to bottom."""
    label = source.label
    try:
        prompt, chosen, rejected, score_c, score_r = convert_row(fmt, row)
    except RowProblem as problem:
        if rules.strict_schema:
            raise MalformedInputError(
                label,
                location,
                problem.field,
                f"{problem} (set curate.rules.strict_schema: false to quarantine such rows)",
            ) from None
        quarantine.add("schema", str(problem), label, location, row, field=problem.field)
        return None

    for name, score in (("score_chosen", score_c), ("score_rejected", score_r)):
        if score is not None and not math.isfinite(score):
            quarantine.add("score", f"{name} is {score}", label, location, row, field=name)
            return None

    if rules.drop_empty:
        for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            blank = next((i for i, m in enumerate(messages) if S.is_blank(m["content"])), None)
            if blank is not None:
                quarantine.add(
                    "empty",
                    f"{name} turn {blank} ({messages[blank]['role']}) is empty, whitespace or invisible characters",
                    label,
                    location,
                    row,
                    field=name,
                )
                return None

    pid = S.pair_id(prompt, chosen, rejected)
    if rules.drop_identical and S.messages_key(chosen) == S.messages_key(rejected):
        quarantine.add(
            "identical",
            "chosen and rejected are identical after whitespace normalization",
            label,
            location,
            row,
            pair_id=pid,
        )
        return None
    if rules.dedupe:
        if pid in seen:
            quarantine.add("duplicate", f"duplicate of {seen[pid]}", label, location, row, pair_id=pid)
            return None
        seen[pid] = f"{label} {location}"

    margin = score_c - score_r if score_c is not None and score_r is not None else None
    if margin is not None:
        if rules.drop_ties and margin == 0:
            quarantine.add("tie", f"score_chosen == score_rejected == {score_c}", label, location, row, pair_id=pid)
            return None
        if rules.min_margin is not None and margin < rules.min_margin:
            quarantine.add(
                "margin", f"margin {margin:.4g} < min_margin {rules.min_margin}", label, location, row, pair_id=pid
            )
            return None

    return {
        "pair_id": pid,
        "prompt_id": S.prompt_id(prompt),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "score_chosen": score_c,
        "score_rejected": score_r,
        "margin": margin,
        "prompt_tokens": None,
        "chosen_tokens": None,
        "rejected_tokens": None,
        "source": label,
        "source_row": location,
        "split": None,
    }


def _apply_length_rules(
    candidates: list[dict[str, Any]],
    raw_by_key: dict[int, Any],
    config: CurateConfig,
    quarantine: _Quarantine,
    trust_remote_code: bool = False,
) -> None:
    tokenizer = load_tokenizer(str(resolve_model(config.tokenizer)), trust_remote_code)
    rules = config.rules
    batch = 1024
    for start in range(0, len(candidates), batch):
        chunk = candidates[start : start + batch]
        prompt_ids = encode_prompts(tokenizer, [c["prompt"] for c in chunk])
        chosen_ids = encode_completions(tokenizer, [c["chosen"] for c in chunk])
        rejected_ids = encode_completions(tokenizer, [c["rejected"] for c in chunk])
        for offset, (record, p, c, r) in enumerate(zip(chunk, prompt_ids, chosen_ids, rejected_ids, strict=True)):
            record.update(prompt_tokens=len(p), chosen_tokens=len(c), rejected_tokens=len(r))
            reason = _length_violation(len(p), len(c), len(r), rules)
            if reason:
                field_name, text = reason
                quarantine.add(
                    "length",
                    text,
                    record["source"],
                    record["source_row"],
                    raw_by_key[start + offset],
                    field=field_name,
                    pair_id=record["pair_id"],
                )
                record["_rejected"] = True


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


def _assign_splits(pairs: list[dict[str, Any]], eval_fraction: float, seed: int) -> None:
    units = {p["prompt_id"]: split_unit(p["prompt_id"], seed) for p in pairs}
    eval_ids = {pid for pid, u in units.items() if u < eval_fraction}
    if eval_fraction > 0 and not eval_ids and len(units) >= 2:
        eval_ids = {min(units, key=units.get)}  # tiny sets: still hold out one prompt
    for p in pairs:
        p["split"] = "eval" if p["prompt_id"] in eval_ids else "train"
