"""Ingest: readers for every file type, format detection and conversion to canonical messages, and the errors
that name the file, line/row and field for every class of malformed input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from creditflow.tasks.configs import CurateConfig, CurateRules, SourceConfig
from creditflow.tasks.data.formats import MalformedInputError, RowProblem, check_columns, convert_row, detect_format
from creditflow.tasks.data.ingest import read_rows, source_digest
from creditflow.tasks.recipes.curate import curate


def U(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def A(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def SYS(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def load(source: SourceConfig) -> list[tuple]:
    """What curation does per source: read, detect, check columns, convert every row."""
    columns, rows = read_rows(source)
    fmt = source.format if source.format != "auto" else detect_format(columns, source.label)
    check_columns(fmt, columns, source.label)
    return [(location, *convert_row(fmt, row)) for location, row in rows]


def curate_strict(path: Path, fmt: str = "auto") -> None:
    curate(
        CurateConfig(sources=[SourceConfig(path=str(path), format=fmt)], rules=CurateRules(strict_schema=True)),
        progress=False,
    )


EXPLICIT_ROWS = [
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Green is a vegetable."},
]
EXPLICIT_EXPECTED = [
    ([U("What is 2+2?")], [A("4")], [A("5")]),
    ([U("Name a primary colour.")], [A("Red.")], [A("Green is a vegetable.")]),
]

# ---------------------------------------------------------------------------------------------------------
# Conversion per format


def test_explicit_strings_become_user_and_assistant_turns():
    prompt, chosen, rejected, sc, sr = convert_row(
        "explicit", {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    )
    assert prompt == [U("What is 2+2?")]
    assert chosen == [A("4")]
    assert rejected == [A("5")]
    assert (sc, sr) == (None, None)


def test_explicit_message_lists_are_kept_turn_for_turn():
    row = {
        "prompt": [SYS("Be brief."), U("Capital of France?")],
        "chosen": [A("Paris.")],
        "rejected": [A("Lyon, I think."), U("Sure?"), A("No.")],
        "extra_column": "ignored",
    }
    prompt, chosen, rejected, sc, sr = convert_row("explicit", row)
    assert prompt == [SYS("Be brief."), U("Capital of France?")]
    assert chosen == [A("Paris.")]
    assert rejected == [A("Lyon, I think."), U("Sure?"), A("No.")]
    assert (sc, sr) == (None, None)


def test_explicit_message_extra_keys_are_dropped():
    row = {
        "prompt": [{"role": "user", "content": "Hi", "name": "bob"}],
        "chosen": [A("Hello")],
        "rejected": [A("Go away")],
    }
    prompt, _, _, _, _ = convert_row("explicit", row)
    assert prompt == [U("Hi")]


def test_ultrafeedback_strips_the_repeated_prompt_turn_and_reads_scores():
    row = {
        "prompt": "Suggest a name for a cat.",
        "prompt_id": "abc123",
        "chosen": [U("Suggest a name for a cat."), A("How about Miso?")],
        "rejected": [U("Suggest a name for a cat."), A("Dog.")],
        "messages": [U("Suggest a name for a cat."), A("How about Miso?")],
        "score_chosen": 8.5,
        "score_rejected": 3,
    }
    prompt, chosen, rejected, sc, sr = convert_row("ultrafeedback", row)
    assert prompt == [U("Suggest a name for a cat.")]
    assert chosen == [A("How about Miso?")]
    assert rejected == [A("Dog.")]
    assert (sc, sr) == (8.5, 3.0)
    assert isinstance(sr, float)


def test_ultrafeedback_nan_score_is_kept_for_the_score_rule():
    row = {
        "prompt": "Q",
        "chosen": [U("Q"), A("a")],
        "rejected": [U("Q"), A("b")],
        "score_chosen": float("nan"),
        "score_rejected": 1.0,
    }
    *_, sc, sr = convert_row("ultrafeedback", row)
    assert math.isnan(sc) and sr == 1.0  # curation quarantines it (rule "score")


def test_completion_that_does_not_start_with_assistant_is_a_row_problem():
    row = {"prompt": "Q", "chosen": [U("a different question"), A("a")], "rejected": [A("b")]}
    with pytest.raises(RowProblem, match="must start with an assistant turn") as info:
        convert_row("explicit", row)
    assert info.value.field == "chosen"


def test_implicit_single_turn_prompt_is_the_shared_user_turn():
    row = {
        "chosen": [U("Tell me a fact."), A("Octopuses have three hearts.")],
        "rejected": [U("Tell me a fact."), A("No.")],
    }
    prompt, chosen, rejected, sc, sr = convert_row("implicit", row)
    assert prompt == [U("Tell me a fact.")]
    assert chosen == [A("Octopuses have three hearts.")]
    assert rejected == [A("No.")]
    assert (sc, sr) == (None, None)


def test_implicit_multi_turn_prompt_is_the_longest_common_prefix():
    shared = [SYS("You are kind."), U("Hi"), A("Hello! How can I help?"), U("Recommend a book.")]
    row = {"chosen": shared + [A("Try 'Dune'.")], "rejected": shared + [A("Read anything.")]}
    prompt, chosen, rejected, _, _ = convert_row("implicit", row)
    assert prompt == shared
    assert chosen == [A("Try 'Dune'.")]
    assert rejected == [A("Read anything.")]


def test_implicit_prefix_backs_off_to_end_before_an_assistant_turn():
    # The conversations diverge at a user turn: the prompt must end right before an assistant turn.
    chosen = [U("Q1"), A("A1"), U("Q2 (chosen)"), A("A2 (chosen)")]
    rejected = [U("Q1"), A("A1"), U("Q2 (rejected)"), A("A2 (rejected)")]
    prompt, c, r, _, _ = convert_row("implicit", {"chosen": chosen, "rejected": rejected})
    assert prompt == [U("Q1")]
    assert c == chosen[1:]
    assert r == rejected[1:]


def test_implicit_without_shared_prompt_is_a_row_problem():
    with pytest.raises(RowProblem, match="share no prompt turns") as info:
        convert_row("implicit", {"chosen": [U("A?"), A("a")], "rejected": [U("B?"), A("b")]})
    assert info.value.field == "chosen"


def test_hh_rlhf_single_turn_transcript():
    chosen = "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
    rejected = "\n\nHuman: What is the capital of France?\n\nAssistant: London, probably."
    for fmt in ("hh_rlhf", "implicit"):
        prompt, c, r, sc, sr = convert_row(fmt, {"chosen": chosen, "rejected": rejected})
        assert prompt == [U("What is the capital of France?")]
        assert c == [A("Paris.")]
        assert r == [A("London, probably.")]
        assert (sc, sr) == (None, None)


def test_hh_rlhf_multi_turn_transcript_and_shared_response_prefix():
    history = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
    # The two answers share "Sure, " - the split must still happen at the last shared Assistant marker.
    chosen = history + "\n\nAssistant: Sure, why did the chicken cross the road?"
    rejected = history + "\n\nAssistant: Sure, no."
    prompt, c, r, _, _ = convert_row("hh_rlhf", {"chosen": chosen, "rejected": rejected})
    assert prompt == [U("Hi there"), A("Hello! How can I help?"), U("Tell me a joke.")]
    assert c == [A("Sure, why did the chicken cross the road?")]
    assert r == [A("Sure, no.")]


def test_hh_rlhf_requires_transcript_strings():
    with pytest.raises(RowProblem, match="transcript strings"):
        convert_row("hh_rlhf", {"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]})
    with pytest.raises(RowProblem, match="Assistant"):
        convert_row("implicit", {"chosen": "plain answer", "rejected": "other answer"})


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["prompt", "chosen", "rejected"], "explicit"),
        (["rejected", "chosen", "prompt", "source"], "explicit"),
        (["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"], "ultrafeedback"),
        (["prompt", "chosen", "rejected", "score_chosen"], "explicit"),  # one score is not UltraFeedback
        (["chosen", "rejected"], "implicit"),
    ],
)
def test_detect_format_from_columns(columns, expected):
    assert detect_format(columns, "some.jsonl") == expected


@pytest.mark.parametrize(
    "rows, expected",
    [
        (EXPLICIT_ROWS[:1], ([U("What is 2+2?")], [A("4")], [A("5")], None, None)),
        (
            [
                {
                    "prompt": "Q",
                    "chosen": [U("Q"), A("yes")],
                    "rejected": [U("Q"), A("no")],
                    "score_chosen": 9,
                    "score_rejected": 2,
                }
            ],
            ([U("Q")], [A("yes")], [A("no")], 9.0, 2.0),
        ),
        (
            [{"chosen": [U("Q"), A("yes")], "rejected": [U("Q"), A("no")]}],
            ([U("Q")], [A("yes")], [A("no")], None, None),
        ),
        (
            [{"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}],
            ([U("Q")], [A("yes")], [A("no")], None, None),
        ),
    ],
    ids=["explicit", "ultrafeedback", "implicit", "hh_rlhf"],
)
def test_auto_detection_end_to_end(tmp_path, rows, expected):
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    assert load(SourceConfig(path=str(path))) == [("line 1", *expected)]


# ---------------------------------------------------------------------------------------------------------
# File types


def test_jsonl_reader_skips_blank_lines_and_numbers_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(EXPLICIT_ROWS[0]) + "\n\n" + json.dumps(EXPLICIT_ROWS[1]) + "\n")
    columns, rows = read_rows(SourceConfig(path=str(path)))
    assert columns == ["prompt", "chosen", "rejected"]
    assert [(loc, row) for loc, row in rows] == [("line 1", EXPLICIT_ROWS[0]), ("line 3", EXPLICIT_ROWS[1])]


def test_json_list_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(EXPLICIT_ROWS, indent=2))
    assert load(SourceConfig(path=str(path))) == [
        ("row 1", *EXPLICIT_EXPECTED[0], None, None),
        ("row 2", *EXPLICIT_EXPECTED[1], None, None),
    ]


def test_parquet_with_message_list_columns(tmp_path):
    rows = [
        {
            "prompt": "Q1",
            "chosen": [U("Q1"), A("good")],
            "rejected": [U("Q1"), A("bad")],
            "score_chosen": 5.0,
            "score_rejected": 1.0,
        },
        {
            "prompt": "Q2",
            "chosen": [U("Q2"), A("fine")],
            "rejected": [U("Q2"), A("poor")],
            "score_chosen": 4.0,
            "score_rejected": None,
        },
    ]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load(SourceConfig(path=str(path))) == [
        ("row 1", [U("Q1")], [A("good")], [A("bad")], 5.0, 1.0),
        ("row 2", [U("Q2")], [A("fine")], [A("poor")], 4.0, None),
    ]


def test_csv_with_json_list_cell(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected", "score_chosen", "score_rejected"])
        writer.writerow(
            [json.dumps([SYS("Be nice."), U("Hi, [friend]")]), "Hello!", json.dumps([A("Whatever.")]), 0.9, 0.1]
        )
        writer.writerow(["[not json", "Yes", "No", 0.5, 0.2])
    assert load(SourceConfig(path=str(path))) == [
        ("row 1", [SYS("Be nice."), U("Hi, [friend]")], [A("Hello!")], [A("Whatever.")], 0.9, 0.1),
        ("row 2", [U("[not json")], [A("Yes")], [A("No")], 0.5, 0.2),
    ]


def _dataset(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


def test_saved_dataset_folder(tmp_path):
    rows = [
        {"chosen": [U("Q"), A("yes")], "rejected": [U("Q"), A("no")]},
        {"chosen": [U("R"), A("ok")], "rejected": [U("R"), A("ko")]},
    ]
    _dataset(rows).save_to_disk(str(tmp_path / "ds"))
    source = SourceConfig(path=str(tmp_path / "ds"))
    assert load(source) == [
        ("row 1", [U("Q")], [A("yes")], [A("no")], None, None),
        ("row 2", [U("R")], [A("ok")], [A("ko")], None, None),
    ]
    assert source_digest(source).startswith("hfds:")


def test_saved_dataset_dict_folder_selects_split(tmp_path):
    import datasets

    train = _dataset(EXPLICIT_ROWS)
    test = _dataset([{"prompt": "Held out?", "chosen": "Yes.", "rejected": "No."}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load(SourceConfig(path=str(tmp_path / "dd"))) == [
        ("row 1", *EXPLICIT_EXPECTED[0], None, None),
        ("row 2", *EXPLICIT_EXPECTED[1], None, None),
    ]
    assert load(SourceConfig(path=str(tmp_path / "dd"), split="test")) == [
        ("row 1", [U("Held out?")], [A("Yes.")], [A("No.")], None, None)
    ]
    with pytest.raises(MalformedInputError, match=r"no split 'validation'") as info:
        read_rows(SourceConfig(path=str(tmp_path / "dd"), split="validation"))
    assert str(tmp_path / "dd") in str(info.value)


def test_hf_load_dataset_builder_over_local_files(tmp_path):
    """The `hf:` path goes through datasets.load_dataset (offline here: the json builder over local files)."""
    data = write_jsonl(tmp_path / "data.jsonl", EXPLICIT_ROWS)
    source = SourceConfig(hf="json", data_files=str(data))
    assert source.label == "hf:json[train]"
    assert load(source) == [("row 1", *EXPLICIT_EXPECTED[0], None, None), ("row 2", *EXPLICIT_EXPECTED[1], None, None)]
    assert source_digest(source).startswith("hfds:")


def _hub_dataset(root: Path, repo: str, files: dict[str, list[dict]], commit: str, refs: tuple[str, ...]) -> None:
    """A dataset repo written into a Hugging Face cache in the hub's own layout (refs/<ref> -> snapshots/<commit>)."""
    folder = root / ("datasets--" + repo.replace("/", "--"))
    for name, rows in files.items():
        (folder / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / "snapshots" / commit / name, rows)
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


def test_hub_dataset_ids_load_offline_through_the_hf_cache_with_revision_name_and_split(tmp_path, monkeypatch):
    """The real hub code path (huggingface_hub's cache, HF_HUB_OFFLINE=1, datasets.load_dataset), no mocks."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    held_out = [{"prompt": "Held out?", "chosen": "Yes.", "rejected": "No."}]
    _hub_dataset(tmp_path / "hub", "acme/prefs", {"data/train.jsonl": EXPLICIT_ROWS}, "a" * 40, ("main",))
    files = {"data/train.jsonl": EXPLICIT_ROWS[:1], "data/test.jsonl": held_out}
    _hub_dataset(tmp_path / "hub", "acme/prefs", files, "b" * 40, ("v2",))  # a tag, cached as refs/v2

    main = SourceConfig(hf="acme/prefs")
    assert load(main) == [("row 1", *EXPLICIT_EXPECTED[0], None, None), ("row 2", *EXPLICIT_EXPECTED[1], None, None)]
    assert source_digest(main) == f"hub:acme/prefs@{'a' * 40}"
    tagged = SourceConfig(hf="acme/prefs", revision="v2", split="test")
    assert tagged.label == "hf:acme/prefs@v2[test]"
    assert load(tagged) == [("row 1", [U("Held out?")], [A("Yes.")], [A("No.")], None, None)]
    assert source_digest(tagged) == f"hub:acme/prefs@{'b' * 40}"  # another commit: another curation fingerprint

    for source, message in [
        (SourceConfig(hf="acme/missing"), r"hf:acme/missing\[train\]: hub dataset 'acme/missing' is not in the Hug"),
        (SourceConfig(hf="acme/prefs", revision="v9"), r"hub dataset 'acme/prefs@v9' .* check the revision"),
    ]:
        with pytest.raises(MalformedInputError, match=message):
            source_digest(source)
    with pytest.raises(ValueError, match="revision applies to hf datasets only"):
        SourceConfig(path="x.jsonl", revision="main")


def test_limit_reads_only_the_first_rows(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "data.jsonl", rows)
    json_file = tmp_path / "data.json"
    json_file.write_text(json.dumps(rows))
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    _dataset(rows).save_to_disk(str(tmp_path / "ds"))
    for path in (jsonl, json_file, parquet, tmp_path / "ds"):
        converted = load(SourceConfig(path=str(path), limit=2))
        assert [prompt for _, prompt, *_ in converted] == [[U("Q0")], [U("Q1")]], path
    columns, it = read_rows(SourceConfig(path=str(jsonl), limit=0))
    assert (columns, list(it)) == ([], [])
    result = curate(CurateConfig(sources=[SourceConfig(path=str(jsonl), limit=3)]), progress=False)
    assert result.metrics["rows_in"] == 3 and result.metrics["pairs_out"] == 3


def test_source_digest_follows_file_content(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", EXPLICIT_ROWS)
    source = SourceConfig(path=str(path))
    first = source_digest(source)
    assert first == source_digest(SourceConfig(path=str(path)))  # stable while the file is unchanged
    write_jsonl(path, EXPLICIT_ROWS[:1])
    second = source_digest(source)
    assert second != first
    write_jsonl(path, EXPLICIT_ROWS)
    assert source_digest(source) == first


def test_builtin_sample_is_readable():
    source = SourceConfig(builtin="sample")
    assert source.label == "builtin:sample"
    columns, rows = read_rows(source)
    assert detect_format(columns, source.label) == "ultrafeedback"
    location, row = next(rows)
    assert location == "line 1" and isinstance(row["prompt"], str)
    assert len(source_digest(source)) == 64


def test_source_config_validation():
    with pytest.raises(ValueError, match="exactly one of"):
        SourceConfig()
    with pytest.raises(ValueError, match="exactly one of"):
        SourceConfig(path="a.jsonl", builtin="sample")
    with pytest.raises(ValueError, match="format"):
        SourceConfig(path="a.jsonl", format="sharegpt")
    with pytest.raises(ValueError, match="builtin"):
        SourceConfig(builtin="nope")


# ---------------------------------------------------------------------------------------------------------
# Malformed input: one test per class; the message names the file, the line/row and the field


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        json.dumps(EXPLICIT_ROWS[0]) + "\n" + json.dumps(EXPLICIT_ROWS[1]) + '\n{"prompt": "Q", "chosen": \n'
    )
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line 3: invalid JSON")
    assert info.value.source == str(path) and info.value.location == "line 3"


def test_invalid_json_file_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "Q", "chosen": "a", "rejected": "b"},\n  {"prompt": \n]')
    with pytest.raises(MalformedInputError) as info:
        read_rows(SourceConfig(path=str(path)))
    assert str(info.value).startswith(f"{path}: line 4: invalid JSON")


def test_json_file_must_hold_a_list(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps(EXPLICIT_ROWS[0]))
    with pytest.raises(MalformedInputError, match="must hold a list") as info:
        read_rows(SourceConfig(path=str(path)))
    assert str(path) in str(info.value)


def test_non_object_json_line(tmp_path):
    path = tmp_path / "list_line.jsonl"
    path.write_text(json.dumps(EXPLICIT_ROWS[0]) + '\n["What is 2+2?", "4", "5"]\n')
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    assert str(info.value) == f"{path}: line 2: expected a JSON object, got list"


def test_non_object_json_list_item(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([EXPLICIT_ROWS[0], "just a string"]))
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    assert str(info.value) == f"{path}: row 2: expected an object, got str"


def test_missing_column_in_parquet(tmp_path):
    path = tmp_path / "no_rejected.parquet"
    pq.write_table(pa.table({"prompt": ["Q"], "chosen": ["a"], "score_chosen": [1.0]}), path)
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path, fmt="explicit")
    message = str(info.value)
    assert message.startswith(f"{path}: field 'rejected': missing column for format 'explicit'")
    assert info.value.field == "rejected"


def test_missing_score_column_for_ultrafeedback_parquet(tmp_path):
    path = tmp_path / "no_score.parquet"
    pq.write_table(pa.table({"prompt": ["Q"], "chosen": ["a"], "rejected": ["b"], "score_chosen": [1.0]}), path)
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path, fmt="ultrafeedback")
    assert str(info.value).startswith(f"{path}: field 'score_rejected': missing column")


def test_missing_key_in_jsonl_line(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [EXPLICIT_ROWS[0], EXPLICIT_ROWS[1], {"prompt": "Q", "chosen": "a"}])
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    assert str(info.value).startswith(f"{path}: line 3: field 'rejected': missing")
    assert (info.value.location, info.value.field) == ("line 3", "rejected")


def test_missing_column_in_every_jsonl_line(tmp_path):
    # A JSONL file has no header: its first object stands for the columns, so the error names that line.
    path = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "Q", "chosen": "a"}, {"prompt": "R", "chosen": "b"}])
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path, fmt="explicit")
    assert str(info.value).startswith(f"{path}: line 1: field 'rejected': missing")


@pytest.mark.parametrize(
    "bad_row, field, text",
    [
        ({"prompt": "Q", "chosen": 42, "rejected": "b"}, "chosen", "expected a string or a list of messages, got int"),
        (
            {"prompt": "Q", "chosen": [{"role": "assistant"}], "rejected": "b"},
            "chosen[0].content",
            "expected a string, got NoneType",
        ),
        (
            {"prompt": "Q", "chosen": [{"role": "assistant", "content": 7}], "rejected": "b"},
            "chosen[0].content",
            "expected a string, got int",
        ),
        (
            {"prompt": [{"role": "human", "content": "Q"}], "chosen": "a", "rejected": "b"},
            "prompt[0].role",
            "expected one of",
        ),
        ({"prompt": ["Q"], "chosen": "a", "rejected": "b"}, "prompt[0]", "expected a message object, got str"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "empty message list"),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": "high", "score_rejected": 1.0},
            "score_chosen",
            "expected a number, got str",
        ),
        (
            {"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": True},
            "score_rejected",
            "expected a number, got bool",
        ),
    ],
    ids=[
        "chosen-int",
        "message-without-content",
        "content-int",
        "bad-role",
        "message-not-object",
        "empty-list",
        "score-string",
        "score-bool",
    ],
)
def test_wrong_types_name_file_line_and_field(tmp_path, bad_row, field, text):
    good = {"prompt": "P", "chosen": "c", "rejected": "r", "score_chosen": 1.0, "score_rejected": 0.0}
    fmt = "ultrafeedback" if "score_chosen" in bad_row else "explicit"
    path = write_jsonl(tmp_path / "types.jsonl", [good, bad_row])
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path, fmt=fmt)
    message = str(info.value)
    assert message.startswith(f"{path}: line 2: field {field!r}: {text}")
    assert (info.value.location, info.value.field) == ("line 2", field)


def test_wrong_type_in_parquet_names_row(tmp_path):
    path = tmp_path / "scores.parquet"
    table = pa.table(
        {
            "prompt": ["Q1", "Q2"],
            "chosen": ["a", "b"],
            "rejected": ["c", "d"],
            "score_chosen": ["1.0", "high"],
            "score_rejected": [0.0, 0.0],
        }
    )
    pq.write_table(table, path)
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    assert str(info.value).startswith(f"{path}: row 1: field 'score_chosen': expected a number, got str")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("prompt\tchosen\trejected\nQ\ta\tb\n")
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    assert str(info.value).startswith(f"{path}: unsupported file type '.tsv'")


def test_file_that_is_not_really_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    write_jsonl(path, EXPLICIT_ROWS)
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    assert str(info.value).startswith(f"{path}: not a readable Parquet file")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(MalformedInputError) as info:
        read_rows(SourceConfig(path=str(path)))
    assert str(info.value) == f"{path}: file does not exist"


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_columns_without_a_detectable_format(tmp_path, suffix):
    rows = [{"question": "Q", "answer": "a", "label": 1}]
    path = tmp_path / f"unknown{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(MalformedInputError) as info:
        curate_strict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot tell the preference format from columns ['answer', 'label', 'question']")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(MalformedInputError, match=r"latin1.jsonl: line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        list(read_rows(SourceConfig(path=str(path)))[1])
    as_json = tmp_path / "latin1.json"
    as_json.write_bytes(b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(MalformedInputError, match=r"latin1.json: line 2: not UTF-8 text"):
        read_rows(SourceConfig(path=str(as_json)))


def test_non_utf8_bytes_in_a_csv_name_the_row_and_field(tmp_path):
    path = tmp_path / "latin1.csv"
    rows = b"".join(f"q{i},good {i},bad {i}\n".encode() for i in range(3))
    path.write_bytes(b"prompt,chosen,rejected\n" + rows + b"caf\xe9,good,bad\n")
    message = r"latin1.csv: row 4: field 'prompt': not UTF-8 text \(byte 0xe9 at position 4 of the cell\)"
    with pytest.raises(MalformedInputError, match=message):
        curate_strict(path)


def test_deeply_nested_json_in_a_csv_cell_names_the_row_and_field(tmp_path):
    path = tmp_path / "deep.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["q", "good", "bad"])
        writer.writerow(["q2", '[{"role": "assistant", "content": ' + "[" * 100_000 + "]" * 100_000 + "}]", "bad"])
    with pytest.raises(MalformedInputError, match=r"deep.csv: row 2: field 'chosen': JSON nested too deeply"):
        curate_strict(path)


def _compress(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    import zstandard

    return {
        "gzip": gzip.compress,
        "bzip2": bz2.compress,
        "xz": lzma.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[kind](data)


@pytest.mark.parametrize("kind,suffix", [("gzip", ".gz"), ("bzip2", ".bz2"), ("xz", ".xz"), ("zstd", ".zst")])
def test_compressed_jsonl_json_and_csv_are_read_by_their_magic_bytes(tmp_path, kind, suffix):
    jsonl = "".join(json.dumps(row) + "\n" for row in EXPLICIT_ROWS).encode()
    as_csv = b"prompt,chosen,rejected\n" + b"".join(
        f"{r['prompt']},{r['chosen']},{r['rejected']}\n".encode() for r in EXPLICIT_ROWS
    )
    files = {
        f"data.jsonl{suffix}": jsonl,
        f"data.json{suffix}": json.dumps(EXPLICIT_ROWS).encode(),
        f"data.csv{suffix}": as_csv,
        "misnamed.jsonl": jsonl,  # compressed although its name says plain: the bytes decide
    }
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(_compress(kind, data))
        loaded = load(SourceConfig(path=str(path)))
        assert [row[1:4] for row in loaded] == EXPLICIT_EXPECTED, name
        assert loaded[0][0] in ("line 1", "row 1"), name


def test_a_truncated_compressed_file_is_named_with_the_line_it_broke_at(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    rows = "".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2000))
    path.write_bytes(_compress("gzip", rows.encode())[:-200])
    with pytest.raises(MalformedInputError, match=r"data.jsonl.gz: line \d+: damaged gzip data"):
        list(read_rows(SourceConfig(path=str(path)))[1])
    archive = tmp_path / "data.jsonl"
    archive.write_bytes(b"PK\x03\x04" + b"\0" * 20)
    with pytest.raises(MalformedInputError, match=r"data.jsonl: the file is a zip archive; extract it first"):
        read_rows(SourceConfig(path=str(archive)))


def test_hh_rlhf_in_its_own_layout_gzipped_jsonl(tmp_path):
    """Anthropic's files: harmless-base/test.jsonl.gz, transcripts in chosen/rejected; a row whose last assistant
    turn is empty is quarantined with its line."""
    rows = [
        {
            "chosen": f"\n\nHuman: How do I bake bread {i}?\n\nAssistant: Knead, rise, bake.",
            "rejected": f"\n\nHuman: How do I bake bread {i}?\n\nAssistant: Buy it.",
        }
        for i in range(5)
    ]
    rows[3]["chosen"] = "\n\nHuman: How do I bake bread 3?\n\nAssistant:"
    folder = tmp_path / "harmless-base"
    folder.mkdir()
    path = folder / "test.jsonl.gz"
    path.write_bytes(_compress("gzip", "".join(json.dumps(r) + "\n" for r in rows).encode()))
    result = curate(CurateConfig(sources=[SourceConfig(path=str(path))], eval_fraction=0.0), progress=False)
    assert result.pairs.num_rows == 4
    quarantined = result.quarantine.to_pylist()
    assert [(q["rule"], q["source_row"], q["field"]) for q in quarantined] == [("empty", "line 4", "chosen")]
    assert result.pairs.column("prompt").to_pylist()[0] == [U("How do I bake bread 0?")]


def _ultrafeedback_rows(split: str, shard: int, n: int) -> list[dict]:
    return [
        {
            "prompt": f"{split} question {shard}-{i}",
            "chosen": [U(f"{split} question {shard}-{i}"), A("good")],
            "rejected": [U(f"{split} question {shard}-{i}"), A("bad")],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for i in range(n)
    ]


def test_ultrafeedback_binarized_parquet_shards_read_as_one_source_naming_each_shard(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, shards in (("train_prefs", 2), ("test_prefs", 1)):
        for shard in range(shards):
            name = f"{split}-{shard:05d}-of-{shards:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(_ultrafeedback_rows(split, shard, 3)), data / name)
    (data / "README.md").write_text("not data")
    train = SourceConfig(path=str(data / "train_prefs-*.parquet"))
    loaded = load(train)
    assert [row[0] for row in loaded] == [
        *(f"train_prefs-00000-of-00002.parquet row {i}" for i in (1, 2, 3)),
        *(f"train_prefs-00001-of-00002.parquet row {i}" for i in (1, 2, 3)),
    ]
    assert loaded[4][1:] == ([U("train_prefs question 1-1")], [A("good")], [A("bad")], 8.0, 3.0)
    assert len(load(SourceConfig(path=str(data)))) == 9  # the folder: every data file in it, README aside
    assert len(load(SourceConfig(path=str(data / "train_prefs-*.parquet"), limit=4))) == 4
    result = curate(CurateConfig(sources=[train]), progress=False)
    assert result.pairs.num_rows == 6
    assert set(result.pairs.column("source_row").to_pylist()) == {row[0] for row in loaded}

    first = source_digest(train)
    pq.write_table(pa.Table.from_pylist(_ultrafeedback_rows("train_prefs", 2, 1)), data / "train_prefs-00002.parquet")
    assert source_digest(train) != first  # a new shard is new content

    with pytest.raises(MalformedInputError, match=r"the pattern matches no file"):
        read_rows(SourceConfig(path=str(data / "valid_prefs-*.parquet")))
    pq.write_table(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"]}), data / "train_prefs-00003.parquet")
    with pytest.raises(MalformedInputError, match=r"train_prefs-00003.parquet: columns \['chosen', 'prompt'"):
        list(read_rows(train)[1])


def test_jsonl_shards_name_their_file_and_line(tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    for shard in range(2):
        write_jsonl(part / f"{shard}.jsonl", EXPLICIT_ROWS)
    assert [row[0] for row in load(SourceConfig(path=str(part)))] == [
        "0.jsonl line 1",
        "0.jsonl line 2",
        "1.jsonl line 1",
        "1.jsonl line 2",
    ]
    (part / "2.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(MalformedInputError, match=r"part: 2.jsonl line 2: invalid JSON"):
        list(read_rows(SourceConfig(path=str(part)))[1])


def test_csv_cells_are_text_except_the_scores(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("prompt,chosen,rejected,score_chosen,score_rejected\n2+2?,4,5,1,0\n007?,0070,7, 2.5 ,\n")
    columns, rows = read_rows(SourceConfig(path=str(path)))
    assert [row for _, row in rows] == [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "score_chosen": 1.0, "score_rejected": 0.0},
        {"prompt": "007?", "chosen": "0070", "rejected": "7", "score_chosen": 2.5, "score_rejected": None},
    ]
    result = curate(CurateConfig(sources=[SourceConfig(path=str(path), format="explicit")]), progress=False)
    assert result.pairs.column("chosen").to_pylist() == [[A("4")], [A("0070")]]


def test_deeply_nested_json_is_a_named_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + '{"prompt": ' + "[" * 100_000 + "\n")
    with pytest.raises(MalformedInputError, match=r"deep.jsonl: line 2: JSON nested too deeply"):
        list(read_rows(SourceConfig(path=str(path)))[1])


def test_row_total_counts_what_read_rows_yields(tmp_path):
    from creditflow.tasks.data.ingest import row_total

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "chosen": "a", "rejected": str(i)}) + "\n\n" for i in range(7)))
    assert row_total(SourceConfig(path=str(path))) == 7 == len(list(read_rows(SourceConfig(path=str(path)))[1]))
    assert row_total(SourceConfig(path=str(path), limit=3)) == 3
    table = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p"] * 5, "chosen": ["a"] * 5, "rejected": ["b"] * 5}), table)
    assert row_total(SourceConfig(path=str(table))) == 5
    (tmp_path / "rows.csv").write_text("prompt,chosen,rejected\np,a,b\n")
    assert row_total(SourceConfig(path=str(tmp_path / "rows.csv"))) is None  # unknown without parsing it
    gzipped = tmp_path / "d.jsonl.gz"
    gzipped.write_bytes(_compress("gzip", path.read_bytes()))
    assert row_total(SourceConfig(path=str(gzipped))) is None  # unknown without decompressing it


# ---------------------------------------------------------------------------------------------------------
# Edge cases of the file formats


def test_a_zstd_file_cut_inside_its_last_frame_is_damaged_data(tmp_path):
    import zstandard

    frames = [
        zstandard.ZstdCompressor().compress("".join(json.dumps(row) + "\n" for row in rows).encode())
        for rows in (EXPLICIT_ROWS, [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(500)])
    ]
    whole = tmp_path / "whole.jsonl.zst"
    whole.write_bytes(b"".join(frames))
    assert len(load(SourceConfig(path=str(whole)))) == 502  # every frame is read
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(b"".join(frames)[:-20])
    with pytest.raises(
        MalformedInputError, match=r"cut.jsonl.zst: line \d+: damaged zstd data \(.*ends inside a frame"
    ):
        list(read_rows(SourceConfig(path=str(cut)))[1])


def test_csv_cells_holding_json_lists_that_are_not_messages_stay_text(tmp_path):
    path = tmp_path / "lists.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["Who is listed?", '[{"name": "ann"}, {"name": "bob"}]', json.dumps([A("Nobody.")])])
        writer.writerow(["Q?", json.dumps([A("Fine."), {"role": "assistant"}]), "No."])  # one message short: text
    assert load(SourceConfig(path=str(path))) == [
        ("row 1", [U("Who is listed?")], [A('[{"name": "ann"}, {"name": "bob"}]')], [A("Nobody.")], None, None),
        ("row 2", [U("Q?")], [A(json.dumps([A("Fine."), {"role": "assistant"}]))], [A("No.")], None, None),
    ]


def test_a_csv_starting_with_a_byte_order_mark_keeps_every_cell_text(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffchosen,prompt,rejected\n4,What is 2+2?,5\n".encode())
    columns, rows = read_rows(SourceConfig(path=str(path)))
    assert columns == ["chosen", "prompt", "rejected"]
    assert list(rows) == [("row 1", {"chosen": "4", "prompt": "What is 2+2?", "rejected": "5"})]


def test_a_csv_row_longer_than_a_megabyte_is_read(tmp_path):
    path = tmp_path / "long.csv"
    answer = "word " * 600_000  # 3 MB
    path.write_text(f"prompt,chosen,rejected\nshort?,fine,no\nlong?,{answer},no\nlast?,yes,no\n")
    assert [row["chosen"] for _, row in read_rows(SourceConfig(path=str(path)))[1]] == ["fine", answer, "yes"]


def test_a_byte_order_mark_starting_a_jsonl_or_json_file_is_skipped(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(row) + "\n" for row in EXPLICIT_ROWS).encode())
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(EXPLICIT_ROWS).encode())
    for path in (jsonl, as_json):
        assert [row[1:4] for row in load(SourceConfig(path=str(path)))] == EXPLICIT_EXPECTED, path.name


def test_an_integer_too_long_to_read_is_invalid_json_naming_file_and_line(tmp_path):
    path = tmp_path / "long_int.jsonl"
    bad = '{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": ' + "9" * 5000 + "}"
    path.write_text(json.dumps(EXPLICIT_ROWS[0]) + "\n" + bad + "\n")
    with pytest.raises(MalformedInputError, match=r"long_int.jsonl: line 2: invalid JSON \(an integer of too many"):
        list(read_rows(SourceConfig(path=str(path)))[1])


def test_json_shard_errors_name_the_shard(tmp_path):
    part = tmp_path / "part"
    part.mkdir()
    (part / "0.json").write_text(json.dumps(EXPLICIT_ROWS))
    (part / "1.json").write_text('[\n{"prompt": "p", "chosen": \n]')
    with pytest.raises(MalformedInputError, match=r"part: 1.json line 3: invalid JSON"):
        list(read_rows(SourceConfig(path=str(part)))[1])
    (part / "1.json").write_text(json.dumps(EXPLICIT_ROWS[0]))
    with pytest.raises(MalformedInputError, match=r"part: 1.json: a .json file must hold a list"):
        list(read_rows(SourceConfig(path=str(part)))[1])
