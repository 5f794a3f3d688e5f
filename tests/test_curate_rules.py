"""Curation rules one by one (quarantine rule, reason, metric, and the flag that turns each off), the
nothing-silently-dropped invariant, token-length rules with a tiny local tokenizer, the prompt-level split and
the bundled sample."""

from __future__ import annotations

import importlib.resources
import json
from collections import Counter
from pathlib import Path

import pytest

from creditflow.tasks.configs import CurateConfig, CurateRules, SourceConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.data.formats import MalformedInputError
from creditflow.tasks.recipes.curate import RULES, curate, split_unit


def U(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def A(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def row(prompt: str, chosen: str, rejected: str, sc: float | None = None, sr: float | None = None) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": sc, "score_rejected": sr}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(
    tmp_path: Path,
    rows: list[dict],
    name: str = "data.jsonl",
    tokenizer: str | None = None,
    eval_fraction: float = 0.1,
    fmt: str = "auto",
    **rules,
):
    path = write_jsonl(tmp_path / name, rows)
    config = CurateConfig(
        sources=[SourceConfig(path=str(path), format=fmt)],
        rules=CurateRules(**rules),
        tokenizer=tokenizer,
        eval_fraction=eval_fraction,
    )
    result = curate(config, progress=False)
    assert_accounted(result)
    return path, result


def assert_accounted(result) -> None:
    """Nothing silently dropped: every row is a pair or a quarantine row, and the counts agree."""
    m = result.metrics
    assert m["rows_in"] == m["pairs_out"] + m["quarantined"]
    assert m["pairs_out"] == result.pairs.num_rows
    assert m["quarantined"] == result.quarantine.num_rows == sum(m[f"quarantined.{r}"] for r in RULES)
    assert result.rule_counts == {r: int(m[f"quarantined.{r}"]) for r in RULES}
    assert m["train_pairs"] + m["eval_pairs"] == m["pairs_out"]
    locations = [(p["source"], p["source_row"]) for p in result.pairs.select(["source", "source_row"]).to_pylist()]
    locations += [
        (q["source"], q["source_row"]) for q in result.quarantine.select(["source", "source_row"]).to_pylist()
    ]
    assert len(locations) == len(set(locations)) == m["rows_in"]


def quarantined(result) -> list[dict]:
    return result.quarantine.to_pylist()


def kept_rows(result) -> list[str]:
    return result.pairs.column("source_row").to_pylist()


def only_counts(result, **expected) -> None:
    assert {r: result.metrics[f"quarantined.{r}"] for r in RULES} == {r: expected.get(r, 0) for r in RULES}


GOOD = [row(f"Question {i}?", f"A helpful answer {i}.", f"A poor answer {i}.", 0.9, 0.1) for i in range(3)]


# ---------------------------------------------------------------------------------------------------------
# One test per rule


def test_clean_rows_all_pass(tmp_path):
    _, result = run(tmp_path, GOOD)
    only_counts(result)
    assert result.metrics["rows_in"] == 3 and result.metrics["pairs_out"] == 3
    first = result.pairs.to_pylist()[0]
    assert first["prompt"] == [U("Question 0?")]
    assert first["chosen"] == [A("A helpful answer 0.")]
    assert first["rejected"] == [A("A poor answer 0.")]
    assert first["margin"] == pytest.approx(0.8)
    assert first["pair_id"] == S.pair_id(first["prompt"], first["chosen"], first["rejected"])
    assert first["prompt_id"] == S.prompt_id(first["prompt"])
    assert first["prompt_tokens"] is None and first["chosen_tokens"] is None  # no tokenizer configured
    assert result.pairs.schema.equals(S.PAIRS_SCHEMA)
    assert result.quarantine.schema.equals(S.QUARANTINE_SCHEMA)


def test_schema_strict_raises_naming_file_line_and_field(tmp_path):
    rows = [*GOOD, row("Q?", "ok", "bad", "high", 0.1)]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(MalformedInputError) as info:
        curate(
            CurateConfig(sources=[SourceConfig(path=str(path))], rules=CurateRules(strict_schema=True)), progress=False
        )
    assert str(info.value).startswith(f"{path}: line 4: field 'score_chosen': expected a number, got str")
    assert "strict_schema: false" in str(info.value)
    assert (info.value.source, info.value.location, info.value.field) == (str(path), "line 4", "score_chosen")


def test_schema_lenient_quarantines_with_field(tmp_path):
    bad = [
        row("Q?", "ok", "bad", "high", 0.1),
        {
            "prompt": "Q?",
            "chosen": [{"role": "assistant"}],
            "rejected": "no",
            "score_chosen": 1.0,
            "score_rejected": 0.0,
        },
        {"prompt": "Q?", "chosen": "yes", "score_chosen": 1.0, "score_rejected": 0.0},
    ]
    path, result = run(tmp_path, [*GOOD, *bad], strict_schema=False)
    only_counts(result, schema=3)
    assert kept_rows(result) == ["line 1", "line 2", "line 3"]
    got = [(q["rule"], q["source"], q["source_row"], q["field"], q["reason"]) for q in quarantined(result)]
    assert got == [
        ("schema", str(path), "line 4", "score_chosen", "expected a number, got str"),
        ("schema", str(path), "line 5", "chosen[0].content", "expected a string, got NoneType"),
        ("schema", str(path), "line 6", "rejected", "missing"),
    ]
    assert json.loads(quarantined(result)[0]["raw"]) == bad[0]  # the raw row is kept for inspection
    assert quarantined(result)[0]["pair_id"] is None


def test_schema_lenient_quarantines_a_bad_first_jsonl_line(tmp_path):
    # The first line of a JSONL file is a row like any other: quarantined, not fatal to the whole file.
    path, result = run(tmp_path, [{"prompt": "Q?", "chosen": "yes"}, *GOOD], fmt="ultrafeedback", strict_schema=False)
    only_counts(result, schema=1)
    [q] = quarantined(result)
    assert (q["source_row"], q["field"], q["reason"]) == ("line 1", "rejected", "missing")
    assert result.metrics["pairs_out"] == 3


def test_empty_rule(tmp_path):
    rows = [*GOOD, row("Q?", "   \n", "Something.", 0.5, 0.1), row(" ", "Yes.", "No.", 0.5, 0.1)]
    _, result = run(tmp_path, rows)
    only_counts(result, empty=2)
    got = [(q["rule"], q["source_row"], q["field"], q["reason"]) for q in quarantined(result)]
    assert got == [
        ("empty", "line 4", "chosen", "chosen turn 0 (assistant) is empty, whitespace or invisible characters"),
        ("empty", "line 5", "prompt", "prompt turn 0 (user) is empty, whitespace or invisible characters"),
    ]
    _, kept = run(tmp_path, rows, name="again.jsonl", drop_empty=False)
    only_counts(kept)
    assert kept_rows(kept) == ["line 1", "line 2", "line 3", "line 4", "line 5"]


def test_empty_rule_checks_every_turn_of_a_conversation(tmp_path):
    rows = [{"prompt": [U("Hi"), A(""), U("Hello?")], "chosen": "Hi!", "rejected": "Bye."}]
    _, result = run(tmp_path, rows)
    [q] = quarantined(result)
    assert (q["rule"], q["field"], q["reason"]) == (
        "empty",
        "prompt",
        "prompt turn 1 (assistant) is empty, whitespace or invisible characters",
    )


def test_invisible_only_turns_are_empty(tmp_path):
    invisible = ["\u200b", "\u200b\u200d\ufeff", " \u2060 ", "\u3164", "\u00ad"]
    rows = [*GOOD, *(row(f"Q{i}?", text, "No.", 0.5, 0.1) for i, text in enumerate(invisible))]
    rows.append(row("Q?", "\u200bYes\u200b", "No.", 0.5, 0.1))  # visible text around zero-width: not empty
    _, result = run(tmp_path, rows)
    only_counts(result, empty=len(invisible))
    assert kept_rows(result)[-1] == f"line {len(rows)}"


def test_score_rule_quarantines_nan_and_infinite_scores(tmp_path):
    path = tmp_path / "scores.jsonl"
    rows = [*GOOD, row("Q1?", "a", "b", float("nan"), 0.1), row("Q2?", "a", "b", 0.5, float("inf"))]
    rows.append(row("Q3?", "a", "b", float("-inf"), 0.1))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN / Infinity literals
    result = curate(CurateConfig(sources=[SourceConfig(path=str(path))]), progress=False)
    assert_accounted(result)
    only_counts(result, score=3)
    got = [(q["source_row"], q["field"], q["reason"]) for q in quarantined(result)]
    assert got == [
        ("line 4", "score_chosen", "score_chosen is nan"),
        ("line 5", "score_rejected", "score_rejected is inf"),
        ("line 6", "score_chosen", "score_chosen is -inf"),
    ]


def test_score_rule_quarantines_integers_beyond_float_range(tmp_path):
    path = tmp_path / "huge.jsonl"
    lines = [json.dumps(r) for r in GOOD]
    lines.append(
        '{"prompt": "Q1?", "chosen": "a", "rejected": "b", "score_chosen": ' + "9" * 400 + ', "score_rejected": 0}'
    )
    lines.append(
        '{"prompt": "Q2?", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": -' + "9" * 400 + "}"
    )
    path.write_text("\n".join(lines) + "\n")
    result = curate(CurateConfig(sources=[SourceConfig(path=str(path))]), progress=False)
    assert_accounted(result)
    only_counts(result, score=2)
    assert [(q["source_row"], q["field"], q["reason"]) for q in quarantined(result)] == [
        ("line 4", "score_chosen", "score_chosen is inf"),
        ("line 5", "score_rejected", "score_rejected is -inf"),
    ]


def test_lone_surrogates_are_a_named_row_problem_and_quarantine_cleanly(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    bad = '{"prompt": "Q?", "chosen": "bad \\ud800 text", "rejected": "No.", "score_chosen": 1, "score_rejected": 0}'
    lines = [json.dumps(r) for r in GOOD] + [bad]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MalformedInputError, match=r"surrogate.jsonl: line 4: field 'chosen': invalid Unicode"):
        curate(CurateConfig(sources=[SourceConfig(path=str(path))]), progress=False)
    lenient = CurateConfig(sources=[SourceConfig(path=str(path))], rules=CurateRules(strict_schema=False))
    result = curate(lenient, progress=False)
    assert_accounted(result)
    [q] = quarantined(result)
    assert (q["rule"], q["field"]) == ("schema", "chosen") and "\\ud800" in q["raw"]
    result.quarantine.to_pandas()  # the quarantine table holds valid UTF-8 (it is written to Parquet)


@pytest.mark.parametrize("fmt", ["hh_rlhf", "implicit"])
def test_lone_surrogates_in_hh_rlhf_transcripts_are_a_named_row_problem(tmp_path, fmt):
    path = tmp_path / "hh.jsonl"
    good = json.dumps({"chosen": "\n\nHuman: Q?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Q?\n\nAssistant: No."})
    bad = '{"chosen": "\\n\\nHuman: Q?\\n\\nAssistant: Yes.", "rejected": "\\n\\nHuman: Q?\\n\\nAssistant: \\ud800"}'
    path.write_text(f"{good}\n{bad}\n")
    source = SourceConfig(path=str(path), format=fmt)
    with pytest.raises(MalformedInputError, match=r"hh.jsonl: line 2: field 'rejected': invalid Unicode"):
        curate(CurateConfig(sources=[source]), progress=False)
    result = curate(CurateConfig(sources=[source], rules=CurateRules(strict_schema=False)), progress=False)
    assert_accounted(result)
    [q] = quarantined(result)
    assert (q["rule"], q["source_row"], q["field"]) == ("schema", "line 2", "rejected") and "\\ud800" in q["raw"]


@pytest.mark.parametrize(
    "text, blank",
    [
        ("\ufe0f\ufe0f", True),  # variation selectors (Mn)
        ("\u034f", True),  # combining grapheme joiner (Mn)
        (" \u20dd\u0301 ", True),  # an enclosing circle (Me) and an accent with no base
        ("\u2028\u3000", True),  # line separator, ideographic space
        ("e\u0301", False),  # é spelled with a combining accent
        ("\U0001f642\ufe0f", False),  # an emoji and its variation selector
        ("\u0915\u093f", False),  # Devanagari consonant and vowel sign (Mc)
    ],
)
def test_marks_without_a_base_character_are_blank(text, blank):
    assert S.is_blank(text) is blank


def test_identical_rule_is_whitespace_insensitive(tmp_path):
    rows = [*GOOD, row("Q?", "Same  answer.\n", " Same answer.", 0.5, 0.1)]
    _, result = run(tmp_path, rows)
    only_counts(result, identical=1)
    [q] = quarantined(result)
    assert (q["rule"], q["source_row"]) == ("identical", "line 4")
    assert q["reason"] == "chosen and rejected are identical after whitespace normalization"
    assert q["pair_id"] == S.pair_id([U("Q?")], [A("Same answer.")], [A("Same answer.")])
    _, kept = run(tmp_path, rows, name="again.jsonl", drop_identical=False)
    only_counts(kept)
    assert "line 4" in kept_rows(kept)


def test_duplicate_rule_keeps_the_first_occurrence(tmp_path):
    rows = [
        row("What is a cat?", "A small feline.", "A dog.", 0.9, 0.1),
        *GOOD,
        row("What  is a cat?\n", " A small   feline.", "A dog. ", 0.9, 0.1),  # same after whitespace normalization
        row("What is a cat?", "A small feline.", "A dog.", 0.9, 0.1),
        row("What is a Cat?", "A small feline.", "A dog.", 0.9, 0.1),  # case matters: not a duplicate
    ]
    path, result = run(tmp_path, rows)
    only_counts(result, duplicate=2)
    got = [(q["rule"], q["source_row"], q["reason"]) for q in quarantined(result)]
    assert got == [
        ("duplicate", "line 5", f"duplicate of {path} line 1"),
        ("duplicate", "line 6", f"duplicate of {path} line 1"),
    ]
    assert kept_rows(result) == ["line 1", "line 2", "line 3", "line 4", "line 7"]
    kept_first = result.pairs.to_pylist()[0]
    assert kept_first["prompt"] == [U("What is a cat?")] and kept_first["chosen"] == [A("A small feline.")]
    assert {q["pair_id"] for q in quarantined(result)} == {kept_first["pair_id"]}
    _, kept = run(tmp_path, rows, name="again.jsonl", dedupe=False)
    only_counts(kept)
    assert kept.metrics["pairs_out"] == 7


def test_duplicate_rule_spans_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", GOOD)
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD[1], row("New?", "Yes.", "No.", 1.0, 0.0)])
    result = curate(CurateConfig(sources=[SourceConfig(path=str(a)), SourceConfig(path=str(b))]), progress=False)
    assert_accounted(result)
    [q] = quarantined(result)
    assert (q["rule"], q["source"], q["source_row"], q["reason"]) == (
        "duplicate",
        str(b),
        "line 1",
        f"duplicate of {a} line 2",
    )


def test_tie_rule(tmp_path):
    rows = [*GOOD, row("Q?", "Fine.", "Also fine.", 0.5, 0.5), row("R?", "Yes.", "No.")]  # null scores: unaffected
    _, result = run(tmp_path, rows)
    only_counts(result, tie=1)
    [q] = quarantined(result)
    assert (q["rule"], q["source_row"], q["reason"]) == ("tie", "line 4", "score_chosen == score_rejected == 0.5")
    assert "line 5" in kept_rows(result)
    _, kept = run(tmp_path, rows, name="again.jsonl", drop_ties=False)
    only_counts(kept)  # margin 0 is not below the default min_margin 0.0
    assert kept.pairs.to_pylist()[3]["margin"] == 0.0


def test_margin_rule_catches_inverted_pairs(tmp_path):
    rows = [*GOOD, row("Q?", "Worse.", "Better.", 0.2, 0.5), row("R?", "Yes.", "No.")]
    _, result = run(tmp_path, rows)
    only_counts(result, margin=1)
    [q] = quarantined(result)
    assert (q["rule"], q["source_row"], q["reason"]) == ("margin", "line 4", "margin -0.3 < min_margin 0.0")
    _, kept = run(tmp_path, rows, name="again.jsonl", min_margin=None)
    only_counts(kept)
    assert kept.pairs.to_pylist()[3]["margin"] == pytest.approx(-0.3)


def test_margin_rule_with_a_positive_minimum(tmp_path):
    rows = [row("Q1?", "a", "b", 0.6, 0.5), row("Q2?", "c", "d", 0.9, 0.1), row("Q3?", "e", "f")]
    _, result = run(tmp_path, rows, min_margin=0.5)
    only_counts(result, margin=1)
    [q] = quarantined(result)
    assert (q["rule"], q["source_row"], q["reason"]) == ("margin", "line 1", "margin 0.1 < min_margin 0.5")
    assert kept_rows(result) == ["line 2", "line 3"]


def test_rule_order_charges_the_first_failed_rule(tmp_path):
    rows = [
        row("Q?", "  ", "  ", 0.5, 0.5),  # empty, identical and tie: charged to empty
        row("R?", "Same.", "Same.", 0.5, 0.5),  # identical and tie: charged to identical
        row("S?", "Yes.", "No.", 0.5, 0.5),  # tie (first occurrence: registered for dedupe)
        row("S?", "Yes.", "No.", 0.5, 0.5),  # duplicate and tie: charged to duplicate
    ]
    _, result = run(tmp_path, rows)
    assert [(q["source_row"], q["rule"]) for q in quarantined(result)] == [
        ("line 1", "empty"),
        ("line 2", "identical"),
        ("line 3", "tie"),
        ("line 4", "duplicate"),
    ]
    assert result.metrics["pairs_out"] == 0


def test_every_row_accounted_for_with_all_rules_firing(tmp_path):
    rows = [
        *GOOD,
        row("Q?", "ok", "bad", "high", 0.1),  # schema
        row("Q?", "", "bad", 0.9, 0.1),  # empty
        row("Q?", "same", "same", 0.9, 0.1),  # identical
        GOOD[0],  # duplicate
        row("T?", "a", "b", 0.3, 0.3),  # tie
        row("M?", "a", "b", 0.1, 0.3),  # margin
    ]
    _, result = run(tmp_path, rows, strict_schema=False)
    only_counts(result, schema=1, empty=1, identical=1, duplicate=1, tie=1, margin=1)
    assert result.metrics["rows_in"] == 9 and result.metrics["pairs_out"] == 3 and result.metrics["quarantined"] == 6
    _, all_off = run(
        tmp_path,
        rows,
        name="off.jsonl",
        strict_schema=False,
        drop_empty=False,
        drop_identical=False,
        dedupe=False,
        drop_ties=False,
        min_margin=None,
    )
    only_counts(all_off, schema=1)  # a row that cannot be converted is never kept
    assert all_off.metrics["pairs_out"] == 8


# ---------------------------------------------------------------------------------------------------------
# Token-length rules


CORPUS = [
    "Hello there, how are you today? I am fine, thank you for asking.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Please write a short review of the new coffee shop on the corner.",
    "It was wonderful, friendly and relaxing; I would happily go back.",
] * 8


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from creditflow.tasks.models.tiny import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tok")
    tokenizer = build_tiny_tokenizer(out, CORPUS, vocab_size=400)
    return str(out), tokenizer


LENGTH_ROWS = [
    row("Hello?", "Fine, thanks.", "No.", 0.9, 0.1),  # line 1: short everything
    row(
        "Please write a short review of the new coffee shop on the corner. " * 6, "Nice.", "Bad.", 0.9, 0.1
    ),  # long prompt
    row(
        "Hi?", "It was wonderful, friendly and relaxing; I would happily go back. " * 5, "Meh.", 0.9, 0.1
    ),  # long chosen
    row(
        "Hey?", "Sure.", "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 5, 0.9, 0.1
    ),  # long rejected
]


def token_lengths(tokenizer, rows: list[dict]) -> list[tuple[int, int, int]]:
    from creditflow.tasks.models.tokenization import encode_completions, encode_prompts

    prompts = [[U(r["prompt"])] for r in rows]
    p = encode_prompts(tokenizer, prompts)
    c = encode_completions(tokenizer, [[A(r["chosen"])] for r in rows])
    r_ = encode_completions(tokenizer, [[A(r["rejected"])] for r in rows])
    return [(len(a), len(b), len(d)) for a, b, d in zip(p, c, r_)]


def test_token_counts_are_filled_from_the_shared_tokenization(tmp_path, tiny_tokenizer):
    tok_dir, tokenizer = tiny_tokenizer
    _, result = run(tmp_path, LENGTH_ROWS, tokenizer=tok_dir)
    only_counts(result)
    expected = token_lengths(tokenizer, LENGTH_ROWS)
    pairs = result.pairs.to_pylist()
    assert [(p["prompt_tokens"], p["chosen_tokens"], p["rejected_tokens"]) for p in pairs] == expected
    # Sanity: the fixture rows really differ where they are meant to.
    short = expected[0]
    assert expected[1][0] > 3 * short[0] and expected[2][1] > 3 * short[1] and expected[3][2] > 3 * short[2]
    # Completions end in EOS; the prompt ends with the generation prompt of the chat template.
    assert all(c >= 2 for _, c, _ in expected)


def test_max_prompt_tokens(tmp_path, tiny_tokenizer):
    tok_dir, tokenizer = tiny_tokenizer
    lengths = token_lengths(tokenizer, LENGTH_ROWS)
    limit = max(p for i, (p, _, _) in enumerate(lengths) if i != 1)
    _, result = run(tmp_path, LENGTH_ROWS, tokenizer=tok_dir, max_prompt_tokens=limit)
    only_counts(result, length=1)
    [q] = quarantined(result)
    assert (q["rule"], q["source_row"], q["field"]) == ("length", "line 2", "prompt")
    assert q["reason"] == f"prompt has {lengths[1][0]} tokens > max_prompt_tokens {limit}"
    assert q["pair_id"] is not None
    assert kept_rows(result) == ["line 1", "line 3", "line 4"]


def test_max_response_tokens(tmp_path, tiny_tokenizer):
    tok_dir, tokenizer = tiny_tokenizer
    lengths = token_lengths(tokenizer, LENGTH_ROWS)
    limit = max(lengths[0][1], lengths[0][2], lengths[1][1], lengths[1][2], lengths[2][2], lengths[3][1])
    _, result = run(tmp_path, LENGTH_ROWS, tokenizer=tok_dir, max_response_tokens=limit)
    only_counts(result, length=2)
    got = [(q["rule"], q["source_row"], q["field"], q["reason"]) for q in quarantined(result)]
    assert got == [
        ("length", "line 3", "chosen", f"chosen has {lengths[2][1]} tokens > max_response_tokens {limit}"),
        ("length", "line 4", "rejected", f"rejected has {lengths[3][2]} tokens > max_response_tokens {limit}"),
    ]
    assert kept_rows(result) == ["line 1", "line 2"]


def test_max_length(tmp_path, tiny_tokenizer):
    tok_dir, tokenizer = tiny_tokenizer
    lengths = token_lengths(tokenizer, LENGTH_ROWS)
    totals = [p + max(c, r) for p, c, r in lengths]
    limit = totals[0]
    assert all(t > limit for t in totals[1:])
    _, result = run(tmp_path, LENGTH_ROWS, tokenizer=tok_dir, max_length=limit)
    only_counts(result, length=3)
    got = [(q["rule"], q["source_row"], q["reason"]) for q in quarantined(result)]
    assert got == [
        ("length", f"line {i + 1}", f"prompt + response is {totals[i]} tokens > max_length {limit}") for i in (1, 2, 3)
    ]
    assert kept_rows(result) == ["line 1"]
    # One token more headroom than the longest keeps everything.
    _, all_kept = run(tmp_path, LENGTH_ROWS, name="again.jsonl", tokenizer=tok_dir, max_length=max(totals))
    only_counts(all_kept)


def test_length_rule_runs_after_row_rules(tmp_path, tiny_tokenizer):
    tok_dir, _ = tiny_tokenizer
    rows = [*LENGTH_ROWS, LENGTH_ROWS[1], row("Tie?", "a", "b", 0.5, 0.5)]
    _, result = run(tmp_path, rows, tokenizer=tok_dir, max_prompt_tokens=1)
    only_counts(result, duplicate=1, tie=1, length=4)
    assert result.metrics["pairs_out"] == 0


@pytest.mark.parametrize("limit", ["max_prompt_tokens", "max_response_tokens", "max_length"])
def test_token_limits_need_a_tokenizer(limit):
    with pytest.raises(ValueError, match="token limits need curate.tokenizer"):
        CurateConfig(rules=CurateRules(**{limit: 100}))
    assert CurateConfig(rules=CurateRules(**{limit: 100}), tokenizer="some/tokenizer").tokenizer == "some/tokenizer"


def test_curate_config_validation():
    with pytest.raises(ValueError, match="sources is empty"):
        CurateConfig(sources=[])
    with pytest.raises(ValueError, match="eval_fraction"):
        CurateConfig(eval_fraction=1.0)
    with pytest.raises(ValueError, match="eval_fraction"):
        CurateConfig(eval_fraction=-0.1)


# ---------------------------------------------------------------------------------------------------------
# Train/eval split by prompt


def many_rows(n_prompts: int, start: int = 0, pairs_per_prompt=lambda i: 1 + (i % 3 == 0)) -> list[dict]:
    rows = []
    for i in range(start, start + n_prompts):
        for j in range(pairs_per_prompt(i)):
            rows.append(
                row(
                    f"Prompt number {i}: say something nice.",
                    f"Something nice {i}/{j}.",
                    f"Something rude {i}/{j}.",
                    0.8,
                    0.2,
                )
            )
    return rows


def splits_by_prompt(result) -> dict[str, str]:
    by_prompt: dict[str, set[str]] = {}
    for p in result.pairs.select(["prompt_id", "split"]).to_pylist():
        by_prompt.setdefault(p["prompt_id"], set()).add(p["split"])
    assert all(len(s) == 1 for s in by_prompt.values()), "a prompt appears in both train and eval"
    return {pid: s.pop() for pid, s in by_prompt.items()}


def test_split_is_by_prompt_and_respects_the_fraction(tmp_path):
    rows = many_rows(500)
    _, result = run(tmp_path, rows, eval_fraction=0.2)
    splits = splits_by_prompt(result)
    assert len(splits) == 500 and result.metrics["pairs_out"] == len(rows)
    n_eval = sum(s == "eval" for s in splits.values())
    assert 0.14 * 500 <= n_eval <= 0.26 * 500
    assert result.metrics["eval_prompts"] == n_eval and result.metrics["train_prompts"] == 500 - n_eval
    pairs = result.pairs.select(["split"]).to_pylist()
    assert result.metrics["eval_pairs"] == sum(p["split"] == "eval" for p in pairs) > 0
    # Multi-pair prompts are kept together.
    assert max(Counter(result.pairs.column("prompt_id").to_pylist()).values()) == 2


def test_split_follows_the_seeded_hash(tmp_path):
    _, result = run(tmp_path, many_rows(200), eval_fraction=0.3)
    for pid, split in splits_by_prompt(result).items():
        assert split == ("eval" if split_unit(pid, 0) < 0.3 else "train")
    path = tmp_path / "data.jsonl"
    other = curate(
        CurateConfig(sources=[SourceConfig(path=str(path))], eval_fraction=0.3, split_seed=1), progress=False
    )
    assert splits_by_prompt(other) != splits_by_prompt(result)  # the seed changes the assignment


def test_split_is_stable_when_rows_are_added(tmp_path):
    _, before = run(tmp_path, many_rows(300), name="before.jsonl")
    grown = many_rows(300) + many_rows(200, start=300) + many_rows(50, pairs_per_prompt=lambda i: 1)[::-1]
    extra = [
        row(f"Prompt number {i}: say something nice.", f"Another nice answer {i}.", f"Another rude one {i}.", 0.7, 0.3)
        for i in range(0, 300, 7)
    ]
    _, after = run(tmp_path, extra + grown, name="after.jsonl", dedupe=True)
    old, new = splits_by_prompt(before), splits_by_prompt(after)
    assert len(new) == 500
    assert {pid: new[pid] for pid in old} == old
    assert "eval" in set(old.values()) and "train" in set(old.values())


def test_tiny_set_still_gets_one_eval_prompt(tmp_path):
    rows = [
        row("Say hi.", "Hi!", "No.", 0.9, 0.1),
        row("Say bye.", "Bye!", "No.", 0.9, 0.1),
        row("Say bye.", "Goodbye!", "Go away.", 0.9, 0.1),
    ]
    ids = [S.prompt_id([U("Say hi.")]), S.prompt_id([U("Say bye.")])]
    assert all(split_unit(pid, 0) >= 0.1 for pid in ids)  # neither would be eval by the hash alone
    _, result = run(tmp_path, rows, eval_fraction=0.1)
    splits = splits_by_prompt(result)
    assert sorted(splits.values()) == ["eval", "train"]
    assert splits[min(ids, key=lambda pid: split_unit(pid, 0))] == "eval"
    assert result.metrics["eval_prompts"] == 1 and result.metrics["train_prompts"] == 1


def test_eval_fraction_zero_and_single_prompt_are_all_train(tmp_path):
    _, none_held = run(tmp_path, many_rows(20), eval_fraction=0.0)
    assert set(splits_by_prompt(none_held).values()) == {"train"}
    assert (
        split_unit(S.prompt_id([U("A lonely prompt.")]), 0) >= 0.5
    )  # not eval by the hash, and the one-eval-prompt fallback needs two prompts
    _, single = run(tmp_path, [row("A lonely prompt.", "Yes.", "No.", 1.0, 0.0)], name="one.jsonl", eval_fraction=0.5)
    assert single.metrics["eval_prompts"] == 0 and single.metrics["train_prompts"] == 1


# ---------------------------------------------------------------------------------------------------------
# The bundled sample


def test_bundled_sample_curates_with_every_noise_rule_firing():
    result = curate(CurateConfig(), progress=False)
    assert_accounted(result)
    m = result.metrics
    assert m["pairs_out"] > 300
    for rule in ("duplicate", "identical", "empty", "tie"):
        assert m[f"quarantined.{rule}"] > 0, rule
    assert m["quarantined.schema"] == 0 and m["quarantined.length"] == 0
    assert m["eval_prompts"] > 0 and m["train_prompts"] > m["eval_prompts"]
    assert set(result.pairs.column("source").to_pylist()) == {"builtin:sample"}


def test_make_sample_regenerates_the_bundled_file():
    from creditflow.tasks.data.sample_data import make_sample

    bundled = (importlib.resources.files("creditflow.data") / "sample_preferences.jsonl").read_text(encoding="utf-8")
    lines = [json.loads(line) for line in bundled.splitlines() if line.strip()]
    generated = make_sample()
    assert len(generated) == len(lines) > 300
    assert generated == lines


def test_a_prompts_pairs_share_its_tokenization_and_keep_exact_counts(tmp_path, tiny_tokenizer):
    """UltraFeedback's all-pairs form: one prompt, 4 answers, 6 pairs. Each distinct text is encoded once, and the
    counts are those of encoding every row on its own (texts that differ only in spaces are not merged)."""
    tok_dir, tokenizer = tiny_tokenizer
    answers = ["Fine, thanks.", "No.", "It was wonderful, friendly and relaxing.", "Bad."]
    rows = [row("How was it?", answers[i], answers[j], 0.9, 0.1) for i in range(4) for j in range(i + 1, 4)]
    rows.append(row("How was it?", "Fine,  thanks.", "Bad idea.", 0.9, 0.1))  # an answer but for one space
    _, result = run(tmp_path, rows, tokenizer=tok_dir, eval_fraction=0.0)
    kept = result.pairs.to_pylist()
    pairs = {(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]): p for p in kept}
    assert len(pairs) == len(rows)
    expected = token_lengths(tokenizer, rows)
    assert expected[0][1] != expected[-1][1]  # the tokenizer sees the extra space
    for r, counts in zip(rows, expected):
        p = pairs[(r["prompt"], r["chosen"], r["rejected"])]
        assert (p["prompt_tokens"], p["chosen_tokens"], p["rejected_tokens"]) == counts
