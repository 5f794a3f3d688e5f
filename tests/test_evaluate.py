"""Evaluation helpers: win rates, gold scorers (built-in and plugin), method labels, comparison rows."""

import pytest
from conftest import publish_artifact

from creditflow.storage.artifacts import ArtifactStore
from creditflow.tasks.configs import method_label
from creditflow.tasks.infer.gold import load_gold_scorer
from creditflow.tasks.recipes.evaluate import comparison_figure, comparison_rows, win_rate


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
            "win_rm": None,
            "token_corr": None,
        },
        {"method": "dpo", "seed": 0, "gold": 0.6, "rm": 1.0, "win_gold": 0.7, "win_rm": 0.6, "token_corr": None},
        {"method": "dpo", "seed": 1, "gold": 0.8, "rm": 2.0, "win_gold": 0.9, "win_rm": 0.8, "token_corr": None},
    ]
    reference, dpo = summary_table(rows)
    assert reference["seeds"] is None and reference["gold"] == (0.5, 0.0)
    assert dpo["seeds"] == 2 and dpo["gold"] == pytest.approx((0.7, 0.1414213), abs=1e-6) and dpo["token_corr"] is None
