"""The token-reward audit: AUC and paired accuracy on hand-made cases, the probe builders, and a real run of every
source on tiny models."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from creditflow.tasks.credit.audit_probes import (
    CAPITALS,
    KINDS,
    PLANTED_KINDS,
    ProbeItem,
    planted_error_probe,
    planted_item,
    sentiment_flip_probe,
    user_probe,
)
from creditflow.tasks.recipes.audit import TokenScores, auc, audit_source, known_items, score_items


def test_auc_hand_values_including_the_inverted_case():
    assert auc([0.0, 1.0], [2.0, 3.0]) == 1.0  # every bad token below every other
    assert auc([2.0, 3.0], [0.0, 1.0]) == 0.0  # inverted: the source points the wrong way
    assert auc([1.0], [1.0, 1.0]) == 0.5  # ties count half
    assert auc([1.0, 3.0], [2.0]) == 0.5
    assert auc([0.0, 2.0], [1.0, 3.0, 5.0]) == pytest.approx(5 / 6)  # 0 < all three, 2 < two of three
    assert math.isnan(auc([], [1.0]))
    rng = np.random.default_rng(0)
    bad, other = rng.normal(size=200), rng.normal(size=300)
    brute = np.mean([(b < o) + 0.5 * (b == o) for b in bad for o in other])
    assert auc(bad, other) == pytest.approx(brute)


def _by_character(scores_of):
    """A scorer with one token per character, each scored by ``scores_of(response, position)``."""

    def scorer(prompts, texts):
        return [
            TokenScores(
                np.array([scores_of(t, i) for i in range(len(t))]), list(range(len(t))), list(range(1, len(t) + 1))
            )
            for t in texts
        ]

    return scorer


def test_audit_rows_on_a_perfect_an_inverted_and_a_blind_scorer():
    probe = [
        ProbeItem("arithmetic", [], "2 + 2 is 5.", [(9, 10)], "2 + 2 is 4.", [(9, 10)]),
        ProbeItem("user", [], "bad word here", [(0, 3)]),
    ]
    digits = {"5": -1.0, "4": 1.0}
    perfect = audit_source(
        "perfect", _by_character(lambda t, i: -1.0 if t == "bad word here" and i < 3 else digits.get(t[i], 0.0)), probe
    )
    by_kind = {r.kind: r for r in perfect}
    assert list(by_kind) == ["arithmetic", "user", "all"]
    assert by_kind["all"].auc == 1.0 and by_kind["arithmetic"].paired == 1.0
    assert by_kind["all"].coverage == 1.0 and by_kind["all"].bad_tokens == 4
    assert math.isnan(by_kind["user"].paired)  # no correct answer to compare with

    inverted = audit_source(
        "inverted", _by_character(lambda t, i: 1.0 if (t[i] == "5" or (t.startswith("bad") and i < 3)) else 0.0), probe
    )
    assert inverted[-1].auc == 0.0 and inverted[0].paired == 0.0
    blind = audit_source("blind", _by_character(lambda t, i: 0.0), probe)
    assert blind[-1].auc == 0.5 and blind[0].paired == 0.5  # equal means: a tie, counted half


def test_planted_known_keeps_the_errors_the_reference_gets_right():
    probe = [
        ProbeItem("arithmetic", [], "2 + 2 is 5.", [(9, 10)], "2 + 2 is 4.", [(9, 10)]),
        ProbeItem("capitals", [], "Paris is in Spain.", [(12, 17)], "Paris is in France.", [(12, 18)]),
        ProbeItem("sentiment", [], "a sad day", [(2, 5)], "a fun day", [(2, 5)]),
    ]
    # The reference prefers "4" to "5" but "Spain" to "France": it knows only the arithmetic answer.
    reference = _by_character(lambda t, i: {"5": -1.0, "4": 1.0}.get(t[i], 1.0 if "Spain" in t else 0.0))
    known = known_items(score_items(reference, probe))
    assert known == {0}  # not the capital it gets wrong, and never a sentiment flip
    # A source that flags only the capital: perfect on the planted pool's capital, at chance where the model knows.
    source = _by_character(lambda t, i: -1.0 if "Spain" in t and 12 <= i < 17 else 0.0)
    rows = {r.kind: r for r in audit_source("source", source, probe, known)}
    assert list(rows) == ["arithmetic", "capitals", "sentiment", "planted", "planted-known", "all"]
    assert rows["planted-known"].items == 1 and rows["planted-known"].bad_tokens == 1
    assert rows["planted-known"].auc == 0.5 and rows["capitals"].auc == 1.0
    assert "planted-known" not in {r.kind for r in audit_source("source", source, probe)}  # no reference, no row


def test_probes_are_seeded_and_their_spans_hold_the_planted_words():
    probe = planted_error_probe(n_per_kind=10, seed=3)
    assert probe == planted_error_probe(n_per_kind=10, seed=3) and probe != planted_error_probe(10, seed=4)
    assert {i.kind for i in probe} == set(PLANTED_KINDS)
    for item in probe:
        (s, e), (os_, oe) = item.bad_spans[0], item.original_spans[0]
        assert s == os_ and item.response[:s] == item.original[:s]  # the same text up to the departure
        assert item.response[s] != item.original[s]  # which is the bad span's first character
    # A shared leading digit is not the error; an answer that stops short errs on the character after it.
    right_digit = planted_item("units", "Q", "It is {} now.", "47", "48")
    assert right_digit.bad_spans == [(7, 8)] and right_digit.response[7:8] == "8"
    short = planted_item("units", "Q", "There are {} minutes.", "600", "60")
    assert short.bad_spans == [(12, 13)] and short.original_spans == [(12, 13)] and short.original[12] == "0"
    capital = next(i for i in probe if i.kind == "capitals")
    country = capital.prompt[0]["content"].removeprefix("What is the capital of ").rstrip("?")
    assert capital.original.endswith(f" is {CAPITALS[country]}.") and capital.response != capital.original
    arithmetic = next(i for i in probe if i.kind == "arithmetic")
    a, op, b = arithmetic.prompt[0]["content"].removeprefix("What is ").rstrip("?").split(" ")
    truth = {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]
    assert arithmetic.original.endswith(f" is {truth}.")

    flips = sentiment_flip_probe(n=20, seed=0)
    assert len(flips) == 20
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    for item in flips:
        (s, e), (os_, oe) = item.bad_spans[0], item.original_spans[0]
        assert lexicon[item.response[s:e]] < 0 < lexicon[item.original[os_:oe]]


def test_user_probe_reads_spans_and_names_bad_lines(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text(
        json.dumps({"prompt": "Capital of France?", "response": "It is Rome.", "bad_spans": [[6, 10]]}) + "\n"
    )
    [item] = user_probe(path)
    assert item.response[6:10] == "Rome" and item.kind == "user"
    path.write_text(json.dumps({"prompt": "Q", "response": "short", "bad_spans": [[2, 99]]}) + "\n")
    with pytest.raises(ValueError, match=r"probe.jsonl: line 1: field 'bad_spans'"):
        user_probe(path)
    path.write_text('{"prompt": "Q"}\n')
    with pytest.raises(ValueError, match=r"probe.jsonl: line 1: expected prompt, response and bad_spans"):
        user_probe(path)


@pytest.mark.slow
def test_every_source_runs_on_tiny_models(tiny_lm_dir, tmp_path):
    from creditflow.tasks.configs import TEMPLATE_PRESETS
    from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
    from creditflow.tasks.recipes.audit import run_audit

    probe = planted_error_probe(n_per_kind=3, seed=0) + sentiment_flip_probe(n=3, seed=0)
    policy = build_tiny_causal_lm(tmp_path / "policy", CORPUS, seed=1)  # the reference's tokenizer, other weights
    reward_model = build_tiny_reward_backbone(tmp_path / "rm", [i.response for i in probe])
    rows = run_audit(tiny_lm_dir, TEMPLATE_PRESETS, probe, max_length=128, reward_model=reward_model, policy=policy)
    sources = set(r.source for r in rows)
    assert sources == {*(f"contrastive:{p}" for p in TEMPLATE_PRESETS), "reference log-prob", "dpo-implicit"} | {
        "abc-official",
        "abc-centered",
    }
    items = {r.kind: r.items for r in rows if r.source == "reference log-prob"}
    assert items["planted"] == 3 * len(PLANTED_KINDS) and items["all"] == items["planted"] + items["sentiment"]
    assert {r.items for r in rows if r.kind == "planted-known"} == {items["planted-known"]}  # one selection for all
    for row in rows:
        assert row.kind in (*KINDS, "planted", "planted-known", "all")
        assert row.items or row.kind == "planted-known"  # the tiny reference may know none of the planted answers
        if row.items:
            assert 0.0 <= row.auc <= 1.0 and row.coverage == 1.0


@pytest.mark.slow
def test_rewards_audit_command_prints_the_table_and_logs_it_to_mlflow(tiny_lm_dir, tmp_path):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from creditflow.flows.cli import app

    probe = tmp_path / "mine.jsonl"
    probe.write_text(json.dumps({"prompt": "What is 2 + 2?", "response": "2 + 2 is 5.", "bad_spans": [[9, 10]]}) + "\n")
    workspace = tmp_path / "ws"
    args = ["rewards", "audit", "--model", str(tiny_lm_dir), "--per-kind", "1", "--sentiment", "1", "--max-length"]
    result = CliRunner().invoke(app, [*args, "128", "--probe", str(probe), "--preset", "prefix", "-w", str(workspace)])
    assert result.exit_code == 0, result.output
    assert "token-reward audit" in result.output and "logged to MLflow" in result.output
    assert "sentiment*" in result.output and "* built from the bundled sample's chosen responses" in result.output

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("creditflow-audit").experiment_id])
    assert run.data.params["presets"] == "prefix" and run.data.params["items"] == str(len(PLANTED_KINDS) + 2)
    assert 0.0 <= run.data.metrics["contrastive:prefix.user.auc"] <= 1.0
    assert 0.0 <= run.data.metrics["contrastive:prefix.all.paired"] <= 1.0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "audit")} == {"audit/table.json", "audit/paired.png"}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "audit/table.json", str(tmp_path))).read_text())
    source = table["columns"].index("source")  # MLflow's table format: pandas' split orient
    assert {row[source] for row in table["data"]} == {"contrastive:prefix", "reference log-prob"}

    unknown = CliRunner().invoke(app, [*args, "128", "--preset", "nope", "-w", str(workspace)])
    assert unknown.exit_code != 0 and "--preset 'nope': presets are revision, guideline, prefix" in unknown.output
