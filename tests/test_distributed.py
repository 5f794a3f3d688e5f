"""compute.backend: ray on a real local Ray cluster (2 workers, started here): token rewards, sampling and reward
scores identical to the local path, and a worker that dies mid-run loses no finished shard.

The local path runs on one CPU thread, as each actor does (Ray sets an actor's threads to the CPUs it reserves): a
different thread count can split a reduction differently (MKL also picks its threads by load) and move the last
bit of a float, which would make "the same bits" a coin toss."""

import os
import sys

import pyarrow.parquet as pq
import pytest
from conftest import pair_row, publish_artifact

from creditflow.storage.shard_results import ShardResults
from creditflow.storage.token_cache import TokenCache, row_key
from creditflow.storage.tracking import Run
from creditflow.storage.workspace import Workspace
from creditflow.tasks import schema as S
from creditflow.tasks.config_base import ComputeConfig, SamplingConfig
from creditflow.tasks.configs import OnPolicyConfig, TokenRewardsConfig
from creditflow.tasks.distributed import resumable_map
from creditflow.tasks.generation import Sampler, generate
from creditflow.tasks.onpolicy import compute_onpolicy
from creditflow.tasks.reward_scoring import score_rewards
from creditflow.tasks.stage import StageContext
from creditflow.tasks.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.token_rewards import build_source, compute_missing, compute_token_rewards, side_requests

ray = pytest.importorskip("ray")  # in the dev install; a plain install runs without it

CORPUS = ["It was lovely, thank you", "It was awful.", "Question: how was the trip?"] * 20
RAY = ComputeConfig(backend="ray", workers=2)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, namespace="creditflow", include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    writer = workspace.store.writer("reward_model", "rm")
    (writer.dir / "model").mkdir()
    for file in reward.iterdir():
        (writer.dir / "model" / file.name).write_bytes(file.read_bytes())
    rm = workspace.store.publish(
        writer, stage="reward_model", fingerprint="rm", inputs={}, config={"max_length": 64}, code_version="t"
    )
    curate = publish_artifact(workspace.store, "curate", "c", {"pairs": S.rows_to_table(pairs, S.PAIRS_SCHEMA)})
    run = Run.start(workspace, "distributed-test", stage)
    out = workspace.store.writer(stage, "t")
    ctx = StageContext(
        config, workspace, {"curate": curate, "reward_model": rm}, out, run, False, stage, "t",
        reference_model=str(policy), compute=compute,
    )  # fmt: skip
    return recipe(ctx), out.dir


@pytest.mark.usefixtures("cluster")
def test_ray_actors_give_the_local_rows_for_contrastive_and_abc(models, tmp_path):
    config = TokenRewardsConfig(sources=["contrastive", "abc"], max_length=64, rows_per_shard=3, batch_size=2)
    pairs = _pairs(5)
    local_metrics, local = _stage(tmp_path / "local", models, pairs, config, None)
    ray_metrics, distributed = _stage(tmp_path / "ray", models, pairs, config, RAY)
    assert ray_metrics["rows_computed"] == local_metrics["rows_computed"] == 20
    rows = [pq.read_table(folder / "token_rewards.parquet").to_pylist() for folder in (local, distributed)]
    assert rows[0] == rows[1]  # same shards, same batches, same code: the same bits


@pytest.mark.usefixtures("cluster")
def test_the_onpolicy_stage_on_ray_writes_the_local_pairs(models, tmp_path):
    config = OnPolicyConfig(enabled=True, samples_per_prompt=3, max_new_tokens=6, batch_size=2, temperature=1.0)
    pairs = _pairs(5)
    outputs = [
        _stage(tmp_path / name, models, pairs, config, compute, compute_onpolicy, "onpolicy")
        for name, compute in (("local", None), ("ray", RAY))
    ]
    (local_metrics, local), (ray_metrics, distributed) = outputs
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
    local = generate(policy, PROMPTS, 2, SAMPLING, progress=False, prompts_per_shard=3)
    assert generate(policy, PROMPTS, 2, SAMPLING, RAY, progress=False, prompts_per_shard=3) == local
    completions = [[{"role": "assistant", "content": text}] for texts in local for text in texts]
    prompts = [p for p in PROMPTS for _ in range(2)]
    jobs = [(prompts, completions), (prompts[:5], completions[:5])]
    local_scores = score_rewards(reward, jobs, progress=False, rows_per_shard=4)
    assert score_rewards(reward, jobs, RAY, progress=False, rows_per_shard=4) == local_scores


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
