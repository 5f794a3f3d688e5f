"""Sharded inference without Ray: per-shard seeding, finished shards stored and reused, the vLLM mapping."""

import json

import pytest

from creditflow.storage.shard_results import ShardResults
from creditflow.tasks.config_base import SamplingConfig
from creditflow.tasks.configs import EvaluateConfig, RLConfig
from creditflow.tasks.infer.distributed import resumable_map
from creditflow.tasks.infer.generation import Sampler, generate, sample_responses, shard_seed, vllm_sampling_args
from creditflow.tasks.infer.reward_scoring import RewardScorer, score_rewards
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone

CORPUS = ["It was lovely, thank you", "It was awful.", "Question: how was the trip?"] * 20
PROMPTS = [[{"role": "user", "content": f"Question {i}: how was the trip?"}] for i in range(7)]
SAMPLING = SamplingConfig(temperature=1.0, max_new_tokens=6, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("lm"), CORPUS)


def test_shard_seeds_keep_shard_zero_on_the_seed_and_never_collide_across_seeds():
    assert shard_seed(5, 0) == 5
    seeds = {shard_seed(seed, shard) for seed in range(4) for shard in range(1, 50)}
    assert len(seeds) == 4 * 49 and not seeds & set(range(4))


def test_sharded_sampling_is_the_per_shard_seeded_concatenation(policy):
    sampler = Sampler(str(policy), 2, SAMPLING.model_dump(mode="json"))
    whole = generate(policy, PROMPTS, 2, SAMPLING, progress=False, prompts_per_shard=3)
    shards = [sampler((i, PROMPTS[s : s + 3])) for i, s in enumerate(range(0, 7, 3))]
    assert whole == [texts for shard in shards for texts in shard]
    # One shard is exactly one seeded sample_responses call, so small sets sample as they always did.
    assert generate(policy, PROMPTS, 2, SAMPLING, progress=False) == sample_responses(
        sampler.model, sampler.tokenizer, PROMPTS, 2, SAMPLING, False
    )
    assert [len(texts) for texts in whole] == [2] * 7


def test_finished_shards_are_reused_and_a_changed_or_corrupted_shard_is_recomputed(policy, tmp_path):
    store = ShardResults(tmp_path / "shards", "samples")
    first = generate(policy, PROMPTS, 2, SAMPLING, store=store, progress=False, prompts_per_shard=3)
    files = sorted((tmp_path / "shards").glob("samples-*.json"))
    assert len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    assert generate(policy, PROMPTS, 2, SAMPLING, store=store, progress=False, prompts_per_shard=3) == first
    assert [f.stat().st_mtime_ns for f in files] == stamps  # read back, not recomputed

    files[1].write_text("{not json")
    files[2].write_text(json.dumps({"rows": first[6:]}))  # no inputs digest
    assert store.read(0, (0, PROMPTS[:3])) == first[:3]
    assert store.read(0, (0, PROMPTS[1:4])) is None  # other inputs under that shard index: not trusted
    assert store.read(1, (1, PROMPTS[3:6])) is None and store.read(2, (2, PROMPTS[6:])) is None
    assert generate(policy, PROMPTS, 2, SAMPLING, store=store, progress=False, prompts_per_shard=3) == first
    assert files[0].stat().st_mtime_ns == stamps[0] and files[1].stat().st_mtime_ns != stamps[1]


def test_two_runs_finishing_one_shard_at_once_each_write_their_own_temporary_file(tmp_path):
    store = ShardResults(tmp_path, "samples")

    class FinishedMeanwhile:
        """Shard inputs whose hashing (inside our write) lets another run of the fingerprint write the shard."""

        def __str__(self):
            store.write(0, "inputs", ["theirs"])
            return "inputs"

    store.write(0, FinishedMeanwhile(), ["ours"])
    assert store.read(0, "inputs") == ["ours"]  # the last rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["samples-00000.json"]


def test_resumable_map_computes_only_missing_shards(tmp_path):
    store = ShardResults(tmp_path, "squares")
    store.write(1, [3, 4], [9, 16])
    calls = []

    def build():
        def square(shard):
            calls.append(shard)
            return [x * x for x in shard]

        return square

    assert resumable_map([[1, 2], [3, 4], [5]], build, None, store, progress=False) == [[1, 4], [9, 16], [25]]
    assert calls == [[1, 2], [5]]
    assert resumable_map([], build, None, store, progress=False) == []


def test_sharded_reward_scores_equal_one_call(tmp_path):
    backbone = build_tiny_reward_backbone(tmp_path / "rm", CORPUS)
    completions = [[{"role": "assistant", "content": f"It was lovely {i}"}] for i in range(7)]
    one_call = RewardScorer(backbone).score(PROMPTS, completions)
    sharded, first_three = score_rewards(
        backbone, [(PROMPTS, completions), (PROMPTS[:3], completions[:3])], progress=False, rows_per_shard=3
    )
    assert sharded == pytest.approx(one_call, abs=1e-6)
    assert first_three == sharded[:3]  # a job's shards are its own: the same batches as a call of its own


def test_vllm_arguments_map_the_hf_knobs():
    args = vllm_sampling_args(SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, seed=4), 3, 0, 2)
    expected = dict(n=3, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=12, seed=6, skip_special_tokens=True)
    assert args == expected
    greedy = vllm_sampling_args(SamplingConfig(temperature=0, top_k=50), 1, 3, 0)
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0, 1.0, -1)
    assert greedy["seed"] == shard_seed(0, 3)


def test_vllm_backend_says_it_is_not_installed_and_rl_refuses_it():
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match="needs vLLM, which is not installed"):
            EvaluateConfig(backend="vllm")
    with pytest.raises(ValueError, match="backend"):
        RLConfig.model_validate({"sampling": {"backend": "vllm"}})
    assert RLConfig().sampling.top_k == 0  # rollouts come from the policy itself
