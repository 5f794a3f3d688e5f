"""Online-RL rollouts on a real local Ray cluster (2 workers, started here): the same token ids and the same training
history as sampling in the trainer, from actors that load the policy once per run and take its new weights every
iteration.

The trainer runs on one CPU thread, as each actor does (see tests/test_distributed.py for why that matters)."""

import pytest
import torch
from conftest import workers_started

from creditflow.tasks.config_base import ComputeConfig
from creditflow.tasks.configs import LoraConfig, RLConfig
from creditflow.tasks.models.tiny import build_tiny_causal_lm, build_tiny_reward_backbone
from creditflow.tasks.recipes.rl import RLTrainer, RolloutSampler
from creditflow.tasks.train.metrics import split_timings

ray = pytest.importorskip("ray")  # in the dev install; a plain install runs without it

CORPUS = ["It was great and lovely.", "It was awful and grim."] + [f"How was day {i}?" for i in range(8)]
PROMPTS = [[{"role": "user", "content": f"How was day {i}?"}] for i in range(8)]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    policy = build_tiny_causal_lm(tmp_path_factory.mktemp("rl_lm"), CORPUS * 4, seed=0)
    reward = build_tiny_reward_backbone(tmp_path_factory.mktemp("rl_rm"), CORPUS * 4, seed=0)
    return policy, reward


def _config(**overrides) -> RLConfig:
    # 4 prompts per iteration in generate() calls of 2: two shards, so both workers sample every iteration
    settings = dict(batch_size=4, samples_per_prompt=2, epochs=2, max_steps=3, learning_rate=1e-3, minibatches=2)
    settings.update(gold_scorer=None, sampling={"max_new_tokens": 6, "batch_size": 2})
    return RLConfig.model_validate({**settings, **overrides})


class RecordingTrainer(RLTrainer):
    """Keeps every iteration's rollouts as token ids."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled = []

    def _rollouts(self, iteration, samplers=None):
        rollouts = super()._rollouts(iteration, samplers)
        self.sampled.append([(r.prompt_ids, r.completion_ids) for r in rollouts])
        return rollouts


def _train(models, config, compute):
    policy, reward = models
    trainer = RecordingTrainer(policy, reward, PROMPTS, config, progress=False, compute=compute)
    content, _ = split_timings(trainer.train())
    return trainer, content


@pytest.mark.usefixtures("cluster")
@pytest.mark.parametrize(
    "overrides",
    [{"algorithm": "ppo"}, {"algorithm": "rloo", "lora": LoraConfig(r=4, alpha=8, target_modules=["q_proj"])}],
    ids=["ppo-full", "rloo-lora"],  # LoRA dropout (0.05) draws from the trainer's stream: sampling must not move it
)
def test_rollouts_on_ray_actors_equal_local_sampling(models, overrides):
    config = _config(**overrides)
    before = workers_started()
    local, local_history = _train(models, config, None)
    assert workers_started() == before  # the local path starts no actor
    distributed, ray_history = _train(models, config, ComputeConfig(backend="ray", workers=2))
    assert len(workers_started() - before) == 2  # one actor per worker for the whole run, not one per iteration
    assert len(distributed.sampled) == 3 and distributed.sampled == local.sampled
    assert ray_history == local_history
    for name, param in local.trainable.items():
        assert torch.equal(param, distributed.trainable[name]), name


def test_a_rollout_sampler_refuses_weights_that_do_not_match_its_trainable_parameters(models):
    policy, _ = models
    sampler = RolloutSampler(str(policy), _config().model_dump(mode="json"))
    weights = {n: p.detach().clone() for n, p in sampler.model.named_parameters()}
    sampler.update(weights)
    with pytest.raises(ValueError, match=r"missing \['"):
        sampler.update({n: w for n, w in list(weights.items())[1:]})
    with pytest.raises(ValueError, match=r"unexpected \['value_head.weight'\]"):
        sampler.update({**weights, "value_head.weight": torch.zeros(1)})
