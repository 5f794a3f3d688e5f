"""compute.backend: ray on a real local Ray cluster (2 workers, started here): token rewards, sampling, reward
scores and the evaluate stage identical to the local path (and shown to have run on Ray actors, not locally), and a
worker that dies mid-run loses no finished shard.

The local path runs on one CPU thread, as each actor does (Ray sets an actor's threads to the CPUs it reserves): a
different thread count can split a reduction differently (MKL also picks its threads by load) and move the last
bit of a float, which would make "the same bits" a coin toss."""

import json
import os
import shutil
import sys

import pyarrow.parquet as pq
import pytest
from conftest import pair_row, publish_artifact, workers_started

from creditflow.storage.shard_results import ShardResults
from creditflow.storage.token_cache import TokenCache, row_key
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace
from creditflow.tasks.config_base import ComputeConfig, SamplingConfig
from creditflow.tasks.configs import CurateConfig, EvaluateConfig, OnPolicyConfig, SourceConfig, TokenRewardsConfig
from creditflow.tasks.data import schema as S
from creditflow.tasks.infer.distributed import resumable_map
from creditflow.tasks.infer.generation import Sampler, generate
from creditflow.tasks.infer.reward_scoring import score_rewards
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.recipes.curate import curate
from creditflow.tasks.recipes.evaluate import compute_evaluate
from creditflow.tasks.recipes.onpolicy import compute_onpolicy
from creditflow.tasks.recipes.token_rewards import build_source, compute_missing, compute_token_rewards, side_requests
from creditflow.tasks.stage import StageContext

ray = pytest.importorskip("ray")  # in the dev install; a plain install runs without it

CORPUS = ["It was lovely, thank you", "It was awful.", "Question: how was the trip?"] * 20
RAY = ComputeConfig(backend="ray", workers=2)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    policy = build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), CORPUS)
    reward = build_tiny_reward_backbone(tmp_path_factory.mktemp("rm"), CORPUS)
    return policy, reward


def _pairs(n: int, tag: str = "") -> list[dict]:
    return [
        pair_row(
            [{"role": "user", "content": f"Question {i}{tag}: how was the trip?"}],
            [{"role": "assistant", "content": f"It was lovely {i}, thank you"}],
            [{"role": "assistant", "content": f"It was awful {i}."}],
            i,
        )
        for i in range(n)
    ]


def _stage(root, models, pairs, config, compute, recipe=compute_token_rewards, stage="token_rewards"):
    """A stage recipe in a fresh workspace, with ``compute`` as the pipeline would pass it; returns its metrics and
    the folder of its outputs."""
    policy, reward = models
    workspace = Workspace.resolve(root)
    upstream = {
        "reward_model": _publish_model(workspace, "reward_model", reward, {"max_length": 64}),
        "curate": publish_artifact(workspace.store, "curate", "c", {"pairs": S.rows_to_table(pairs, S.PAIRS_SCHEMA)}),
    }
    if stage == "evaluate":  # the tiny LM stands in for the trained policy and is the reference it started from
        upstream["policy"] = _publish_model(workspace, "policy", policy, {"loss": {"loss_type": "dpo"}})
        upstream["token_rewards"] = publish_artifact(
            workspace.store, "token_rewards", "tr", {}, {"reference_model": str(policy)}
        )
    run = Run.start(workspace, "distributed-test", stage)
    out = workspace.store.writer(stage, "t")
    ctx = StageContext(
        config=config,
        workspace=workspace,
        upstream=upstream,
        writer=out,
        run=run,
        progress=False,
        stage=stage,
        fingerprint="t",
        reference_model=str(policy),
        compute=compute,
    )
    return recipe(ctx), out.dir


def _publish_model(workspace, stage: str, folder, config: dict):
    """A ``stage`` artifact holding a copy of the model in ``folder`` as its ``model/`` folder."""
    writer = workspace.store.writer(stage, stage)
    shutil.copytree(folder, writer.dir / "model")
    return workspace.store.publish(writer, stage=stage, fingerprint=stage, inputs={}, config=config, code_version="t")


@pytest.mark.usefixtures("cluster")
def test_ray_actors_give_the_local_rows_for_contrastive_and_abc(models, tmp_path):
    config = TokenRewardsConfig(sources=["contrastive", "abc"], max_length=64, rows_per_shard=3, batch_size=2)
    pairs = _pairs(5)
    before = workers_started()
    local_metrics, local = _stage(tmp_path / "local", models, pairs, config, None)
    assert workers_started() == before  # the local path starts no actor
    ray_metrics, distributed = _stage(tmp_path / "ray", models, pairs, config, RAY)
    assert len(workers_started() - before) == 4  # 2 workers for each of the 2 sources (4 shards each)
    assert ray_metrics["rows_computed"] == local_metrics["rows_computed"] == 20
    rows = [pq.read_table(folder / "token_rewards.parquet").to_pylist() for folder in (local, distributed)]
    assert rows[0] == rows[1]  # same shards, same batches, same code: the same bits


@pytest.mark.usefixtures("cluster")
def test_the_onpolicy_stage_on_ray_writes_the_local_pairs(models, tmp_path):
    config = OnPolicyConfig(enabled=True, samples_per_prompt=3, max_new_tokens=6, batch_size=2, temperature=1.0)
    pairs = _pairs(5)
    before = workers_started()
    local_metrics, local = _stage(tmp_path / "local", models, pairs, config, None, compute_onpolicy, "onpolicy")
    assert workers_started() == before  # the local path starts no actor
    ray_metrics, distributed = _stage(tmp_path / "ray", models, pairs, config, RAY, compute_onpolicy, "onpolicy")
    assert len(workers_started() - before) == 2  # one sampler, one reward scorer: each job is a single shard here
    assert local_metrics == ray_metrics and local_metrics["samples"] == 15
    for table in ("pairs", "quarantine"):
        assert pq.read_table(distributed / f"{table}.parquet") == pq.read_table(local / f"{table}.parquet")
    assert not list(tmp_path.glob("*/checkpoints/onpolicy/t/shards"))  # dropped once the outputs are written


def _dies_on_second_shard(name: str, config: dict, **models):
    """A real source whose worker process exits (as a killed or OOM-ed worker would) on its second shard."""
    source = build_source(name, config, **models)
    score, calls = source.score, []

    def score_then_die(items, progress):
        calls.append(1)
        if len(calls) == 2:
            os._exit(1)
        return score(items, progress)

    source.score = score_then_die
    return source


@pytest.mark.usefixtures("cluster")
def test_a_dead_worker_loses_no_finished_shard_and_the_rerun_computes_only_the_rest(models, tmp_path):
    from functools import partial

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the dying builder travels to the worker
    policy, _ = models
    config = TokenRewardsConfig(max_length=64, rows_per_shard=2, batch_size=2)
    _, _, prompts, completions = side_requests(S.rows_to_table(_pairs(3, " (kill)"), S.PAIRS_SCHEMA))
    cache = TokenCache(tmp_path / "cache")
    settings = config.model_dump(mode="json")
    source = build_source("contrastive", settings, reference_model=str(policy))
    dying = partial(_dies_on_second_shard, "contrastive", settings, reference_model=str(policy))
    one_worker = ComputeConfig(backend="ray", workers=1)
    with pytest.raises(ray.exceptions.RayActorError):
        compute_missing(cache, source, prompts, completions, 2, False, one_worker, dying)
    keys = [row_key(source.name, source.knobs, p, c) for p, c in zip(prompts, completions)]
    assert len(cache.missing_keys(keys)) == 4  # the first shard (2 rows) was written before the worker died
    rerun = compute_missing(
        cache, source, prompts, completions, 2, False, RAY, partial(build_source, "contrastive", settings, str(policy))
    )
    assert (rerun.computed, rerun.reused) == (4, 2)  # 6 rows in shards of 2: the first shard survived


PROMPTS = [[{"role": "user", "content": f"Question {i}: how was the trip?"}] for i in range(7)]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=6, batch_size=2, seed=3)


@pytest.mark.usefixtures("cluster")
def test_sampling_and_reward_scores_on_ray_equal_local(models):
    policy, reward = models
    before = workers_started()
    local = generate(policy, PROMPTS, 2, SAMPLING, progress=False, prompts_per_shard=3)
    assert workers_started() == before  # the local path starts no actor
    assert generate(policy, PROMPTS, 2, SAMPLING, RAY, progress=False, prompts_per_shard=3) == local
    samplers = workers_started() - before
    assert len(samplers) == 2  # 3 shards: both workers sampled
    completions = [[{"role": "assistant", "content": text}] for texts in local for text in texts]
    prompts = [p for p in PROMPTS for _ in range(2)]
    jobs = [(prompts, completions), (prompts[:5], completions[:5])]
    local_scores = score_rewards(reward, jobs, progress=False, rows_per_shard=4)
    assert workers_started() == before | samplers
    assert score_rewards(reward, jobs, RAY, progress=False, rows_per_shard=4) == local_scores
    assert len(workers_started() - before - samplers) == 2  # 6 shards: both workers scored


def _sampler_dies_on_second_shard(folder: str, k: int, sampling: dict):
    sampler, calls = Sampler(folder, k, sampling), []

    def sample_then_die(shard):
        calls.append(1)
        if len(calls) == 2:
            os._exit(1)
        return sampler(shard)

    return sample_then_die


@pytest.mark.usefixtures("cluster")
def test_a_dead_sampler_loses_no_finished_shard(models, tmp_path):
    from functools import partial

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    policy, _ = models
    shards = [(i, PROMPTS[start : start + 3]) for i, start in enumerate(range(0, 7, 3))]
    settings = SAMPLING.model_dump(mode="json")
    store = ShardResults(tmp_path, "samples")
    dying = partial(_sampler_dies_on_second_shard, str(policy), 2, settings)
    with pytest.raises(ray.exceptions.RayActorError):
        resumable_map(shards, dying, ComputeConfig(backend="ray", workers=1), store, progress=False)
    assert [f.name for f in tmp_path.glob("samples-*.json")] == ["samples-00000.json"]
    stamp = (tmp_path / "samples-00000.json").stat().st_mtime_ns
    rerun = resumable_map(shards, partial(Sampler, str(policy), 2, settings), RAY, store, progress=False)
    assert [texts for shard in rerun for texts in shard] == generate(
        policy, PROMPTS, 2, SAMPLING, progress=False, prompts_per_shard=3
    )
    assert (tmp_path / "samples-00000.json").stat().st_mtime_ns == stamp  # reused, not sampled again


@pytest.mark.slow  # ~20 s on 2 cores: two systems sampled and scored, twice
@pytest.mark.usefixtures("cluster")
def test_the_evaluate_stage_on_ray_writes_the_local_generations(models, tmp_path):
    config = EvaluateConfig(max_prompts=3, max_new_tokens=6, batch_size=2, temperature=1.0, gold_scorer=None)
    pairs = [{**row, "split": "eval"} for row in _pairs(3, " (eval)")]
    before = workers_started()
    local_metrics, local = _stage(tmp_path / "local", models, pairs, config, None, compute_evaluate, "evaluate")
    assert workers_started() == before  # the local path starts no actor
    ray_metrics, distributed = _stage(tmp_path / "ray", models, pairs, config, RAY, compute_evaluate, "evaluate")
    # One sampler per system (a single shard each), and both workers for the reward-model scores (one shard per
    # system: shards never span two jobs).
    assert len(workers_started() - before) == 4
    assert ray_metrics == local_metrics and local_metrics["prompts"] == 3
    generations = [pq.read_table(folder / "generations.parquet") for folder in (local, distributed)]
    assert generations[0].num_rows == 6 and generations[1] == generations[0]


@pytest.mark.usefixtures("cluster")
def test_curation_on_ray_checks_each_shard_on_a_worker_and_writes_the_local_output(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # duplicates across shards, so the in-order merge matters
        rows = [
            {"prompt": f"prompt {j}", "chosen": f"good {j}", "rejected": f"bad {j}"} for j in range(i * 4, i * 4 + 6)
        ]
        rows.append({"prompt": f"prompt {i}", "chosen": "same", "rejected": "same"})
        (shards / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = CurateConfig(sources=[SourceConfig(path=str(shards)), SourceConfig(builtin="sample")], eval_fraction=0.3)
    before = workers_started()
    local = curate(config, progress=False)
    assert workers_started() == before
    distributed = curate(config, progress=False, compute=RAY)
    assert len(workers_started() - before) == 3  # the folder's three files on two workers, the sample's on one
    assert distributed.pairs.equals(local.pairs) and distributed.quarantine.equals(local.quarantine)
    assert distributed.metrics == local.metrics
    duplicates = [q for q in local.quarantine.to_pylist() if q["rule"] == "duplicate" and q["source"] == str(shards)]
    assert [q["source_row"] for q in duplicates] == [
        "part-1.jsonl line 1",
        "part-1.jsonl line 2",
        "part-2.jsonl line 1",
        "part-2.jsonl line 2",
    ]
    assert local.pairs.column("source_row").to_pylist()[:2] == ["part-0.jsonl line 1", "part-0.jsonl line 2"]
