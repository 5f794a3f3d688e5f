"""reward_model.pretrained: an existing reward model used as it is, offline, from tiny models in a hub-layout cache.

Two stand-ins: a plain sequence classifier with a tokenizer of its own (not the policy's), and a custom-code one
whose output carries its reward in ``score`` (ArmoRM's form) next to per-objective ``rewards``, no ``logits``.
"""

import json

import pyarrow.parquet as pq
import pytest
import torch
from conftest import pair_row, point_config_at_code, publish_artifact

from creditflow.flows.config import validate
from creditflow.flows.registry import STAGES, pin_hub_revisions
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace
from creditflow.tasks.configs import RewardModelConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.infer.reward_scoring import encode_for_reward, reward_batch, score_pairs
from creditflow.tasks.models.loading import load_reward_model
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.recipes.reward_model import compute_reward_model
from creditflow.tasks.stage import PRETRAINED_RECORD, StageContext, reward_model_location

CPU = torch.device("cpu")
RM_CORPUS = ["Reward models read the whole conversation and answer with one number."] * 20  # not the policy's
ARMO_MODEL = '''from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny-armo"


@dataclass
class TinyArmoOutput(ModelOutput):
    score: torch.FloatTensor | None = None
    rewards: torch.FloatTensor | None = None


class TinyArmoRewardModel(LlamaPreTrainedModel):
    """Per-objective rewards at the last token; their mean is the preference score (ArmoRM gates 19 of them)."""

    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 3, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        last = attention_mask.sum(-1) - 1
        rewards = self.regression_layer(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        return TinyArmoOutput(score=rewards.mean(-1, keepdim=True), rewards=rewards)
'''


def _hub_repo(hub, repo: str, commit: str):
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return folder / "snapshots" / commit


def build_armo(snapshot) -> None:
    """The custom-code reward model: its config sends transformers to modeling_armo.py (auto_map)."""
    import importlib.util

    build_tiny_causal_lm(snapshot, RM_CORPUS, seed=3)  # its tokenizer, and a Llama config to start from
    (snapshot / "modeling_armo.py").write_text(ARMO_MODEL)
    for weights in snapshot.glob("*.safetensors"):
        weights.unlink()
    spec = importlib.util.spec_from_file_location("modeling_armo", snapshot / "modeling_armo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json.loads((snapshot / "config.json").read_text())
    torch.manual_seed(3)
    module.TinyArmoRewardModel(module.TinyArmoConfig.from_dict(config)).save_pretrained(snapshot)
    auto_map = {
        "AutoConfig": "modeling_armo.TinyArmoConfig",
        "AutoModelForSequenceClassification": "modeling_armo.TinyArmoRewardModel",
    }
    point_config_at_code(snapshot, "tiny-armo", "TinyArmoRewardModel", auto_map)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    build_tiny_reward_backbone(_hub_repo(root, "acme/tiny-rm", "a" * 40), RM_CORPUS, seed=1)
    build_armo(_hub_repo(root, "acme/tiny-armo", "b" * 40))
    return root


@pytest.fixture
def offline_hub(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _pairs(n: int) -> list[dict]:
    good, bad = ["great", "lovely", "wonderful"], ["awful", "sad", "boring"]
    return [
        pair_row(
            [{"role": "user", "content": f"How was day {i}?"}],
            [{"role": "assistant", "content": f"It was {good[i % 3]}."}],
            [{"role": "assistant", "content": f"It was {bad[i % 3]}, sadly."}],
            i,
            "eval" if i % 2 else "train",
        )
        for i in range(n)
    ]


def test_a_custom_code_reward_model_scores_with_its_own_score_field(offline_hub):
    folder = resolve_model("acme/tiny-armo")
    assert folder.name == "b" * 40
    with pytest.raises(ValueError, match="trust_remote_code: true"):
        load_reward_model(folder, CPU)
    tokenizer, model = load_reward_model(folder, CPU, trust_remote_code=True)
    assert type(model).__name__ == "TinyArmoRewardModel" and model.regression_layer.out_features == 3  # its head
    pairs = _pairs(4)
    prompts, answers = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    scores = score_pairs(model, tokenizer, prompts, answers, 64, 3)
    encoded = encode_for_reward(tokenizer, prompts, answers, 64)
    for i, score in enumerate(scores):
        with torch.no_grad():
            out = model(**reward_batch(encoded, [i], tokenizer.pad_token_id, CPU))
        assert "logits" not in out and score == pytest.approx(out.score[0, 0].item(), abs=1e-6)
        assert score == pytest.approx(out.rewards[0].mean().item(), abs=1e-6)


def test_the_stage_evaluates_a_pretrained_reward_model_without_training_it(offline_hub, tmp_path):
    workspace = Workspace.resolve(tmp_path / "ws")
    curate = publish_artifact(workspace.store, "curate", "c", {"pairs": S.rows_to_table(_pairs(12), S.PAIRS_SCHEMA)})
    config = RewardModelConfig(pretrained="acme/tiny-rm", max_length=64)
    writer = workspace.store.writer("reward_model", "r")
    ctx = StageContext(
        config=config,
        workspace=workspace,
        upstream={"curate": curate},
        writer=writer,
        run=Run.start(workspace, "pretrained-rm", "reward_model"),
        progress=False,
        stage="reward_model",
        fingerprint="r",
    )
    metrics = compute_reward_model(ctx)
    assert metrics["train_pairs"] == 0 and metrics["eval_pairs"] == 6 and 0 <= metrics["eval.accuracy"] <= 1
    assert not (writer.dir / "model").exists()  # no copy of its weights
    assert pq.read_table(writer.dir / "eval_scores.parquet").num_rows == 6
    manifest = workspace.store.publish(
        writer, stage="reward_model", fingerprint="r", inputs={}, config=config.model_dump(), code_version="t"
    )
    assert reward_model_location(workspace.store, manifest) == resolve_model("acme/tiny-rm")
    record = json.loads(workspace.store.file(manifest, PRETRAINED_RECORD).read_text())
    assert record["pretrained"] == "acme/tiny-rm"
    tags = ctx.run.client.get_run(ctx.run.run_id).data.tags
    assert tags["creditflow.pretrained_reward_model"] == "acme/tiny-rm"

    # The fingerprint is the resolved snapshot: pinned at the start of a run, its weights and tokenizer digested.
    pinned, cfg = pin_hub_revisions({"reward_model": {"pretrained": "acme/tiny-rm"}})
    assert pinned["reward_model"]["pretrained"] == f"acme/tiny-rm@{'a' * 40}"
    digest = STAGES["reward_model"].input_digests(cfg)["pretrained"]
    assert digest["revision"] == "a" * 40 and set(digest) == {"revision", "weights", "tokenizer"}
    with pytest.raises(ValueError, match="pretrained .* and base_model .* are exclusive"):
        validate({"reward_model": {"pretrained": "acme/tiny-rm", "base_model": "minilm"}})


@pytest.mark.slow
def test_a_pipeline_uses_the_pretrained_reward_model_everywhere(offline_hub, tmp_path, lm_eval_tasks, monkeypatch):
    """A custom-code reward model with its own tokenizer: on-policy labelling, ABC token rewards (projected onto the
    policy's tokens), the policy's T-REG term, online RL with ABC credit, and evaluation; nothing trains it."""
    from creditflow.flows.config import PipelineConfig
    from creditflow.flows.pipeline import pipeline_flow

    cfg = PipelineConfig().model_dump(mode="json")
    cfg["trust_remote_code"] = True
    cfg["curate"]["sources"] = [{"builtin": "sample", "limit": 60}]
    cfg["reward_model"] = {"pretrained": "acme/tiny-armo", "max_length": 128}
    cfg["onpolicy"].update(enabled=True, samples_per_prompt=3, max_new_tokens=10, max_prompts=12)
    cfg["token_rewards"].update(sources=["contrastive", "abc"], max_length=256, max_prompt_length=128)
    cfg["policy"].update(max_steps=2, batch_size=4, token_reward_source="abc")
    cfg["rl"].update(
        enabled=True,
        max_steps=1,
        batch_size=4,
        samples_per_prompt=2,
        reward_source="abc",
        sampling={"max_new_tokens": 8},
    )
    cfg["evaluate"].update(max_prompts=4, max_new_tokens=8, judge="tiny-lm")  # a (random) local chat model judges
    cfg["evaluate"].update(lm_eval_tasks=["creditflow_tiny_cloze"], lm_eval_include_path=str(lm_eval_tasks))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    stages = pipeline_flow(config=cfg, workspace=str(tmp_path / "ws"), progress=False)["stages"]
    rm = stages["reward_model"]["manifest"]
    assert PRETRAINED_RECORD in rm["outputs"] and not any(name.startswith("model/") for name in rm["outputs"])
    assert rm["inputs"]["pretrained"]["revision"] == "b" * 40 and rm["metrics"]["train_pairs"] == 0
    assert rm["config"]["pretrained"] == f"acme/tiny-armo@{'b' * 40}"
    assert stages["onpolicy"]["manifest"]["row_counts"]["pairs"] > 0
    assert stages["token_rewards"]["manifest"]["metrics"]["abc.rows_computed"] > 0
    assert stages["rl"]["manifest"]["metrics"]["iterations"] == 1
    evaluated = stages["evaluate"]["manifest"]
    assert {"win_rate_rm", "lc_win_rate_rm", "win_rate_judge", "lc_win_rate_judge", "win_rate_judge.rl"} <= set(
        evaluated["metrics"]
    )
    assert set(evaluated["inputs"]["judge"]) == {"weights", "tokenizer"}  # the judge is in the stage's fingerprint
    capability = "lm_eval.creditflow_tiny_cloze.acc"
    assert {f"{capability}.reference", f"{capability}.policy", f"{capability}.change.rl"} <= set(evaluated["metrics"])
    assert evaluated["inputs"]["lm_eval"] and evaluated["inputs"]["lm_eval_tasks"]

    # The workspace's policies answer a benchmark's prompts, by default the newest policy, RL policy and reference.
    from typer.testing import CliRunner

    from creditflow.flows.cli import app

    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "How was the day?", "dataset": "test"}]))
    args = ["generations", str(tmp_path / "alpaca.json"), "--out", str(tmp_path / "out"), "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, [*args, "-w", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out" / "alpaca_eval").iterdir()) == [
        "policy.json",
        "reference.json",
        "rl.json",
    ]


def _bench_file(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_reward_bench_reports_accuracy_per_subset_for_any_reward_model(offline_hub, tmp_path):
    from typer.testing import CliRunner

    from creditflow.flows.cli import app
    from creditflow.tasks.configs import SourceConfig
    from creditflow.tasks.infer.reward_bench import reward_bench
    from creditflow.tasks.infer.reward_scoring import RewardScorer

    rows = [
        {"prompt": f"How was day {i}?", "chosen": f"It was {g}.", "rejected": f"It was {b}.", "subset": s}
        for i, (g, b, s) in enumerate(
            [("great", "awful", "chat"), ("lovely", "sad", "chat"), ("fine", "bad", "safety")] * 3
        )
    ]
    rows.append({"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello!", "rejected": "Go away."})
    _bench_file(tmp_path / "bench.jsonl", rows)
    source = SourceConfig(path=str(tmp_path / "bench.jsonl"))
    for model, trust in (("acme/tiny-rm", False), ("acme/tiny-armo", True)):
        report = {r.subset: r for r in reward_bench(resolve_model(model), source, 64, 4, trust)}
        assert [(name, r.rows) for name, r in report.items()] == [
            ("chat", 6),
            ("safety", 3),
            ("all", 1),
            ("overall", 10),
        ]
        scorer = RewardScorer(resolve_model(model), 64, 4, trust_remote_code=trust)
        chat = [r for r in rows if r.get("subset") == "chat"]
        prompts = [[{"role": "user", "content": r["prompt"]}] for r in chat]
        answers = {k: [[{"role": "assistant", "content": r[k]}] for r in chat] for k in ("chosen", "rejected")}
        wins = [
            c > r for c, r in zip(scorer.score(prompts, answers["chosen"]), scorer.score(prompts, answers["rejected"]))
        ]
        assert report["chat"].accuracy == pytest.approx(sum(wins) / len(wins))

    cli = CliRunner()
    args = ["rewards", "bench", str(tmp_path / "bench.jsonl"), "--model", "acme/tiny-armo", "-w", str(tmp_path / "ws")]
    result = cli.invoke(app, args + ["--max-length", "64"])
    assert result.exit_code != 0 and "trust_remote_code" in result.output  # custom code needs the flag
    result = cli.invoke(app, args + ["--max-length", "64", "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert "safety" in result.output and "overall" in result.output and "logged to MLflow" in result.output

    _bench_file(tmp_path / "bad.jsonl", [rows[0], {"prompt": "Why?", "chosen": "", "rejected": "No."}])
    bad = ["rewards", "bench", str(tmp_path / "bad.jsonl"), "--model", "acme/tiny-rm", "-w", str(tmp_path / "ws")]
    result = cli.invoke(app, bad)
    assert result.exit_code != 0 and "bad.jsonl line 2, field 'chosen'" in result.output
    _bench_file(tmp_path / "bad.jsonl", [rows[0], {"prompt": "Why?", "chosen": "Yes."}, rows[1]])
    result = cli.invoke(app, bad)
    assert result.exit_code != 0 and "bad.jsonl line 2: no field 'rejected'" in result.output
