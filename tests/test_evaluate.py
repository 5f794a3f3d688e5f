"""Evaluation helpers: win rates, gold scorers (built-in and plugin), method labels, comparison rows."""

import numpy as np
import pytest
from conftest import publish_artifact

from creditflow.storage.artifacts import ArtifactStore
from creditflow.tasks.configs import method_label
from creditflow.tasks.infer.gold import load_gold_scorer
from creditflow.tasks.infer.judging import LC_RIDGE, length_controlled_win_rate, win_rate
from creditflow.tasks.recipes.evaluate import comparison_figure, comparison_rows


def length_scorer(prompts, completions):
    """A plugin gold scorer for the test: longer is better."""
    return [float(len(c)) for c in completions]


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate([], []) != win_rate([], [])  # nan: no prompts, no verdict


def test_gold_scorers():
    vader = load_gold_scorer("vader")
    happy, sad = vader([[]] * 2, ["What a wonderful, lovely day!", "This is awful and sad."])
    assert happy > 0.5 and sad < -0.5
    plugin = load_gold_scorer("test_evaluate:length_scorer")
    assert plugin([[]], ["abc"]) == [3.0]
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_gold_scorer("nonsense")
    with pytest.raises(ValueError, match="cannot import"):
        load_gold_scorer("no_such_module_xyz:f")


def test_method_labels():
    assert method_label({"loss": {"loss_type": "dpo", "alpha": 0.0}}) == "dpo"
    label = method_label({"loss": {"loss_type": "simpo", "alpha": 0.25}, "token_reward_source": "contrastive"})
    assert label == "simpo + T-REG (contrastive, α=0.25)"


def test_comparison_rows_join_evaluations_to_their_policies(tmp_path):
    import pyarrow as pa

    store = ArtifactStore(tmp_path)

    def publish(stage, fingerprint, config, inputs, metrics):
        table = {"t": pa.table({"x": [fingerprint]})}
        return publish_artifact(store, stage, fingerprint, table, config, inputs=inputs, metrics=metrics)

    dpo = publish("policy", "a" * 24, {"loss": {"loss_type": "dpo", "alpha": 0.0}, "seed": 1}, {}, {})
    treg = publish(
        "policy",
        "b" * 24,
        {"loss": {"loss_type": "dpo", "alpha": 0.25}, "token_reward_source": "contrastive", "seed": 1},
        {},
        {},
    )
    publish(
        "evaluate", "c" * 24, {}, {"upstream": {"policy": dpo.digest}}, {"win_rate_rm": 0.5, "gold_score.policy": 0.1}
    )
    publish(
        "evaluate", "d" * 24, {}, {"upstream": {"policy": treg.digest}}, {"win_rate_rm": 0.7, "gold_score.policy": 0.3}
    )
    rows = comparison_rows(store)
    assert {r["method"]: r["win_rate_rm"] for r in rows} == {"dpo": 0.5, "dpo + T-REG (contrastive, α=0.25)": 0.7}
    assert all(r["seed"] == 1 for r in rows)
    figure = comparison_figure(rows)
    assert len(figure.axes) == 3 and len(figure.axes[0].patches) == 2


def test_demo_variants_and_the_summary_over_seeds():
    from creditflow.flows.demo import summary_table, variants

    runs = variants([0, 1], 0.25, ("dpo", "t-reg-abc"))
    assert [name for name, _ in runs] == [
        "demo dpo seed=0",
        "demo dpo+t-reg-abc seed=0",
        "demo dpo seed=1",
        "demo dpo+t-reg-abc seed=1",
    ]
    abc = runs[1][1]
    assert abc["policy.token_reward_source"] == "abc" and abc["token_rewards.sources"] == ["contrastive", "abc"]
    assert runs[0][1] == {"policy.loss.alpha": 0.0, "policy.seed": 0}
    with pytest.raises(ValueError, match="--method 'kto'"):
        variants([0], 0.25, ("kto",))
    rows = [
        {
            "method": "reference",
            "seed": None,
            "gold": 0.5,
            "rm": 1.0,
            "win_gold": None,
            "lc_win_gold": None,
            "win_rm": None,
            "lc_win_rm": None,
            "token_corr": None,
        },
        {"method": "dpo", "seed": 0, "gold": 0.6, "rm": 1.0, "win_gold": 0.7, "win_rm": 0.6, "token_corr": None},
        {"method": "dpo", "seed": 1, "gold": 0.8, "rm": 2.0, "win_gold": 0.9, "win_rm": 0.8, "token_corr": None},
    ]
    for row, lc in zip(rows[1:], (0.5, 0.7)):
        row.update(lc_win_gold=lc, lc_win_rm=lc)
    reference, dpo = summary_table(rows)
    assert reference["seeds"] is None and reference["gold"] == (0.5, 0.0) and reference["lc_win_rm"] is None
    assert dpo["lc_win_gold"] == pytest.approx((0.6, 0.1414213), abs=1e-6)
    assert dpo["seeds"] == 2 and dpo["gold"] == pytest.approx((0.7, 0.1414213), abs=1e-6) and dpo["token_corr"] is None


# ---------------------------------------------------------------------------------------------------------
# Length-controlled win rate and the pairwise judge


def _penalized_glm(results, delta) -> float:
    """The same GLM fitted by scipy's general-purpose optimizer: σ(θ) of the penalized cross-entropy minimum."""
    from scipy.optimize import minimize

    y, x = np.asarray(results), np.tanh(np.asarray(delta) / np.std(delta))

    def loss(w):
        z = w[0] + w[1] * x
        return np.sum(np.logaddexp(0, z) - y * z) + LC_RIDGE / 2 * np.sum(w**2)

    theta = minimize(loss, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x[0]
    return 1 / (1 + np.exp(-theta))


def test_length_controlled_win_rate_removes_what_length_explains():
    rng = np.random.default_rng(0)
    n = 400
    delta = rng.normal(60, 100, n)  # the policy writes longer on ~73% of prompts
    reference = rng.integers(100, 400, n)
    policy = reference + delta.round().astype(int)
    by_length = [1.0 if d > 0 else 0.0 for d in policy - reference]  # it wins exactly when it is longer
    lc = length_controlled_win_rate(by_length, policy.tolist(), reference.tolist())
    assert np.mean(by_length) > 0.7 and abs(lc - 0.5) < 0.1
    by_quality = rng.choice([1.0, 0.5, 0.0], size=n, p=[0.65, 0.1, 0.25]).tolist()  # independent of length
    lc = length_controlled_win_rate(by_quality, policy.tolist(), reference.tolist())
    assert lc == pytest.approx(np.mean(by_quality), abs=0.03)
    assert lc == pytest.approx(_penalized_glm(by_quality, policy - reference), abs=1e-6)
    same = length_controlled_win_rate([1.0, 1.0, 0.0, 0.5], [10] * 4, [10] * 4)  # no length to control for
    assert same == pytest.approx(0.625, abs=0.01)
    assert 0.5 < length_controlled_win_rate([1.0] * 5, [1, 2, 3, 4, 5], [3] * 5) < 1  # finite when it always wins


@pytest.fixture(scope="module")
def judges(tmp_path_factory, tiny_lm_dir):
    """Two tiny chat models fine-tuned on judge prompts: one answers with the letter of the response that says
    "good", one always answers "A" (a judge that follows the position)."""
    import shutil

    from creditflow.tasks.credit.gym import train_sft
    from creditflow.tasks.infer.judging import JUDGE_PROMPT

    def prompt(a: str, b: str) -> list[dict]:
        return [{"role": "user", "content": JUDGE_PROMPT.format(instruction="Say how it was.", a=a, b=b)}]

    good, bad = "It was good.", "It was bad."
    examples = {"content": [(prompt(good, bad), "A"), (prompt(bad, good), "B")], "position": []}
    examples["position"] = [(prompt(good, bad), "A"), (prompt(bad, good), "A")]
    folders = {}
    for name, data in examples.items():
        folders[name] = tmp_path_factory.mktemp(f"judge-{name}") / "model"
        shutil.copytree(tiny_lm_dir, folders[name])
        train_sft(folders[name], data * 8, steps=150, seed=0, lr=3e-3, batch_size=8)  # content needs ~150
    return folders


def _judge(folder):
    from creditflow.tasks.infer.judging import PairwiseJudge
    from creditflow.tasks.models.loading import load_generation_model

    tokenizer, model = load_generation_model(folder, "cpu")
    return PairwiseJudge(model, tokenizer, batch_size=2)


def test_the_judge_compares_in_both_orders_and_calls_a_split_verdict_a_tie(judges):
    instructions = ["Say how it was."] * 3
    good, bad = ["It was good."] * 3, ["It was bad."] * 3
    content = _judge(judges["content"])
    assert content.compare(instructions, good, bad) == [1.0] * 3
    assert content.compare(instructions, bad, good) == [0.0] * 3
    position = _judge(judges["position"])
    assert min(position.prefers_first(instructions, good, bad) + position.prefers_first(instructions, bad, good)) > 0.5
    assert position.compare(instructions, good, bad) == position.compare(instructions, bad, good) == [0.5] * 3


def test_the_results_tables_read_whole_in_80_columns(monkeypatch):
    """The demo's end-of-run tables, every column and every method label whole, in an 80-column terminal."""
    from rich.console import Console

    from creditflow.flows import render
    from creditflow.flows.demo import summary_table

    monkeypatch.setattr(render, "console", Console(width=80, record=True))
    values = dict(gold=0.716, rm=-1.105, win_gold=0.59, lc_win_gold=0.61, win_rm=0.59, lc_win_rm=0.55, token_corr=0.2)
    rows = [
        {"method": "reference (no training)", "seed": None, **dict.fromkeys(values), "gold": 0.5, "rm": 1.0},
        *({"method": "dpo + T-REG (contrastive, α=0.25)", "seed": s, **values} for s in (0, 1)),
        {"method": "simpo + T-REG (abc, α=0.25)", "seed": 0, **values},
    ]
    render.print_comparison([{**row, "prompts": 64} for row in rows])
    render.print_summary(summary_table(rows))
    text = render.console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    for words in ("(contrastive, α=0.25)", "+ T-REG", "(no training)", "LC", "corr", "0.61", "±0.000", "2 seeds"):
        assert words in text, words


def test_generations_are_written_in_alpaca_eval_and_arena_hard_formats(tiny_lm_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from creditflow.flows.cli import app

    alpaca = [{"instruction": "Name a fox.", "dataset": "helpful_base"}, {"instruction": "Say hi.", "dataset": "oasst"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    arena = [{"question_id": "q1", "category": "arena-hard-v0.1", "turns": [{"content": "Explain dogs."}]}]
    (tmp_path / "arena.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arena))
    cli = CliRunner()
    for name, file in (("alpaca", "alpaca.json"), ("arena", "arena.jsonl")):
        args = ["generations", str(tmp_path / file), "--out", str(tmp_path / name), "--max-new-tokens", "4"]
        result = cli.invoke(app, args + ["--model", f"tiny={tiny_lm_dir}", "--model", f"again={tiny_lm_dir}"])
        assert result.exit_code == 0, result.output
    outputs = json.loads((tmp_path / "alpaca" / "alpaca_eval" / "tiny.json").read_text())
    assert [(o["instruction"], o["generator"], o["dataset"]) for o in outputs] == [
        ("Name a fox.", "tiny", "helpful_base"),
        ("Say hi.", "tiny", "oasst"),
    ]
    assert all(isinstance(o["output"], str) for o in outputs)
    again = json.loads((tmp_path / "alpaca" / "alpaca_eval" / "again.json").read_text())
    assert [o["output"] for o in again] == [o["output"] for o in outputs]  # same seed, same answers
    [answer] = [
        json.loads(line) for line in (tmp_path / "arena" / "arena_hard" / "tiny.jsonl").read_text().splitlines()
    ]
    assert answer["question_id"] == "q1" and answer["model_id"] == "tiny" and answer["answer_id"]
    assert isinstance(answer["choices"][0]["turns"][0]["content"], str) and answer["tstamp"] > 0

    (tmp_path / "bad.jsonl").write_text('{"question_id": "q1", "turns": []}\n')
    result = cli.invoke(
        app, ["generations", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x"), "--model", "t=tiny-lm"]
    )
    assert (
        result.exit_code != 0 and "bad.jsonl line 1: no 'instruction', 'prompt' or 'turns[0].content'" in result.output
    )


def test_lm_eval_scores_a_model_on_a_local_task_offline(tiny_lm_dir, lm_eval_tasks, monkeypatch):
    """The harness's own `hf` model on a tiny task of our own (the capability check's engine), no network."""
    import torch

    from creditflow.tasks.infer.capabilities import run_lm_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = run_lm_eval(tiny_lm_dir, ["creditflow_tiny_cloze"], str(lm_eval_tasks), torch.device("cpu"), 4, None)
    assert set(results) == {"creditflow_tiny_cloze"} and 0.0 <= results["creditflow_tiny_cloze"]["acc"] <= 1.0
    with pytest.raises(ValueError, match="'creditflow_tiny_cloze' is not a harness task"):
        run_lm_eval(tiny_lm_dir, ["creditflow_tiny_cloze"], None, torch.device("cpu"), 4, 1)


def test_the_results_table_shows_capability_scores(monkeypatch):
    from rich.console import Console

    from creditflow.flows import render

    monkeypatch.setattr(render, "console", Console(width=120, record=True))
    metrics = {"win_rate_rm": 0.6, "lc_win_rate_rm": 0.55, "lm_eval.arc_easy.acc.change.policy": -0.0125}
    render.print_results({"stages": {"evaluate": {"manifest": {"metrics": metrics}}}})
    text = render.console.export_text()
    assert "lc_win_rate_rm" in text and "lm_eval.arc_easy.acc.change.policy" in text and "-0.0125" in text
