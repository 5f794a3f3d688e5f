"""Stage 4b (optional): online RL from the reference policy, PPO, RLOO or GRPO, on dense per-token rewards.

Every iteration the policy samples ``samples_per_prompt`` rollouts for ``batch_size`` train prompts (the shared
generation module: the ids exactly as sampled), each rollout gets a reward and per-token credit, and the policy takes
``ppo_epochs`` x ``minibatches`` clipped steps on them (tasks/losses/rl.py has the formulas):

    r_t = reward_source_t - kl_coef * (log pi(y_t) - log pi_ref(y_t))        per-token KL penalty to pi_ref

(``kl_penalty: loss`` moves the KL out of the reward into the loss: kl_coef times the k3 estimator per token.)
r, a rollout's outcome, is ``reward_model_weight`` times the reward model's score plus each of the user's
``reward_functions`` (``package.module:function(prompts, completions) -> floats``, e.g. a checker of verifiable
answers) times its weight. ``reward_source`` says how r and any dense credit reach the tokens:
    sparse           r on the last token (the usual RLHF reward);
    abc              Attention-Based Credit, the official form (Chan et al. 2024, "Dense Reward for Free in RLHF",
                     arXiv 2402.00782): r_t = beta * a_t * r + (1 - beta) * r * [t = last policy token], a_t the
                     reward model's last-layer, head-averaged attention from its read-out position over the
                     response tokens, normalized over them; sum_t r_t = r;
    contrastive      sparse + contrastive_scale * r_hat_t, r_hat the T-REG contrastive token reward of the
                     reference model (tasks/credit/contrastive.py) on the sampled ids;
    abc+contrastive  abc + contrastive_scale * r_hat_t;
    dpo_implicit     sparse + implicit_beta * (log pi_dpo(y_t) - log pi_ref(y_t)), pi_dpo the policy stage's DPO
                     policy: RTO's reward (Zhong et al. 2024, "DPO Meets PPO: Reinforced Token Optimization for
                     RLHF"; implicit_beta defaults to that policy's loss.beta);
    function         sparse + the per-token credit of the user's ``credit_function(rollouts)`` (each rollout's
                     prompt, text, completion_ids, char_start/char_end spans and truncated flag): a step checker,
                     a process reward, or the credit gym's oracle (tasks/credit/gym.py).
A user function's part of r always goes on the last token (ABC spreads only the reward model's score).

PPO: a value head (one linear layer on the policy's last hidden state, zero-initialized, trained with weight
``vf_coef``), GAE(gamma, lam), clipped value loss. RLOO: no value head; each rollout's summed reward minus the
mean of the other k - 1 rollouts of its prompt, on all its tokens (TRL's form); ``rloo_token`` does the same per
position on returns-to-go, which keeps dense token credit. GRPO: no value head; the outcome r (less the summed KL
penalty when it is in the reward) normalized within each prompt's group (``scale_rewards``), plus the source's
dense credit normalized over the group's tokens, times ``credit_weight``: a sparse source is plain GRPO. Advantages
are whitened over the iteration's tokens (``whiten_advantages``; by default not for GRPO, already normalized).
The loss is aggregated as ``loss_type`` says (TRL's dapo, grpo, dr_grpo), clipped at 1 - clip_range and
1 + clip_range_high (DAPO's clip-higher). Rollouts that hit ``max_new_tokens`` without a stop token are kept,
masked out of the loss, or penalized (``truncated``).

Old log-probs, values, the KL and the rewards come from the policy in eval mode, the mode it sampled in; with
``disable_dropout`` (default) the policy has no dropout at all, LoRA's included, so the first minibatch's ratio is
exactly 1. With one optimizer step per batch (``ppo_epochs``, ``minibatches`` and ``grad_accum`` all 1) and no
dropout, the training forward is that pass too: its detached log-probs are pi_old, and no second pass runs. Full
fine-tuning keeps a frozen copy of the reference; LoRA runs get pi_ref by disabling the adapters. Every pass over
the rollouts runs each prompt once for its k completions (tasks/models/shared_prompts.py).

Where this differs from the official ABC code (XanderJC/attention-based-credit, abcrl/attention/redistribution.py
and experiments/scripts/rlhf_*.py, read at commit 0a08591):
- Read-out row. The official code takes the attention row of the last *response* position in the policy's indexing
  of a re-tokenized text and assumes the two tokenizations line up. Here the row is the reward model's own read-out
  position (its last non-pad token for decoders, CLS for encoders), the one its score is computed from.
- Tokenizers. The official code needs the policy and reward model to share a tokenizer (GPT-2/GPT-2, LLaMA/LLaMA).
  Here the rewards move from the reward model's tokens to the policy's through character spans, preserving the sum,
  so any pair of tokenizers works.
- Template and prompt tokens. Both drop attention paid to prompt keys. The official code keeps special tokens
  that fall inside the response slice; here only tokens overlapping the response text get attention shares (chat
  template tokens around it are excluded), and the shares are renormalized over them.
- Remainder. Both put (1 - beta) * r on the last token; here it is the policy's last sampled token (its EOS when it
  stopped), whatever the reward model's tokenization of the text.
- Truncation. The official code right-aligns a truncated attention map onto the response. Here the reward model
  sees the conversation cut from the left (the response is kept); response tokens it could not see get no
  attention share, and a response it sees no token of (empty, or truncated away) gets the sparse reward (its
  credit is then r on its last token, so it still sums to r); the share of such rollouts is logged as
  ``abc_fallback_fraction`` and warned about.
- Trainer. The official code uses TRL 0.7.4's PPOTrainer (adaptive KL from 0.2 towards 6, gamma 1, lam 0.95,
  vf_coef 0.1, no reward whitening); the defaults here are a fixed kl_coef 0.05 (``kl_target`` turns the same
  adaptive controller on), gamma 1, lam 0.95, vf_coef 0.1, and the same clip ranges (0.2).

Training is one process (no DDP); checkpoints (trainable weights incl. the value head, optimizer, schedule, RNG,
iteration, KL coefficient, history) every ``save_every`` iterations, so a killed run resumes exactly.

Rollouts: in the trainer, or with the pipeline's ``compute.backend: ray`` on Ray actors
(tasks/infer/distributed.py), each
holding a copy of the policy built as the trainer builds it, loaded once per run. Every iteration the trainer puts
its trainable weights (the LoRA adapters, or every parameter) in the object store once, each actor loads them, and
the actors sample the iteration's shards (one generate() call of ``sampling.batch_size`` prompts each, seeded by
shard index): the same token ids as sampling in the trainer. vLLM is not supported for rollouts: its engine would
need the new weights every iteration.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from creditflow.tasks.configs import RLConfig
from creditflow.tasks.credit.rl_rewards import Rollout, RolloutRewards, TokenRewards, token_spans
from creditflow.tasks.data.schema import Messages, split_rows, unique_prompts
from creditflow.tasks.infer.distributed import RayWorkers, ray_session, uses_ray
from creditflow.tasks.infer.generation import Rollouts, sample_token_ids, stop_token_ids
from creditflow.tasks.infer.gold import load_gold_scorer
from creditflow.tasks.losses.rl import (
    AdaptiveKL,
    aggregate_loss,
    clipped_policy_loss,
    gae,
    group_advantages,
    group_token_credit,
    k3_kl,
    masked_mean,
    rloo_advantages,
    rloo_token_advantages,
    value_loss,
    whiten,
)
from creditflow.tasks.models.causal_lm import save_trained_lm, trained_model_folder, trained_outputs
from creditflow.tasks.models.loading import (
    disable_dropout,
    load_generation_tokenizer,
    load_policy_model,
    load_reference_model,
)
from creditflow.tasks.models.logprobs import states_entropy, states_logprobs
from creditflow.tasks.models.model_card import write_trained_cards
from creditflow.tasks.models.precision import autocast, resolve_device
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.shared_prompts import PromptGroups, grouped_logprobs, token_states
from creditflow.tasks.models.tokenization import pad_token_id
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.train.checkpoint import Checkpoint
from creditflow.tasks.train.metrics import StepCallback, history_table, split_timings
from creditflow.tasks.train.optim import adamw, cosine_schedule, warmup_steps
from creditflow.tasks.train.trainer import Trainer

if TYPE_CHECKING:
    from creditflow.tasks.config_base import ComputeConfig
    from creditflow.tasks.stage import StageContext

RLOO_ADVANTAGES = {"rloo": rloo_advantages, "rloo_token": rloo_token_advantages}  # rl.algorithm -> estimator
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_rl(ctx: StageContext) -> dict[str, float]:
    """Train an RL policy from the reference on the train prompts; write ``model/`` (and/or the LoRA ``adapter/``),
    ``train_log`` and ``samples``."""

    config: RLConfig = ctx.config
    prompts = unique_prompts(split_rows(ctx.read_upstream("curate", "pairs"), "train"), config.sampling.max_prompts)
    if not prompts.num_rows:
        raise ValueError("rl: the curated pairs have no train-split prompts")
    reward_model = ctx.upstream["reward_model"]
    reference, reward_dir = resolve_model(ctx.reference_model), ctx.reward_model_folder()
    implicit = {}
    if config.reward_source == "dpo_implicit":  # RTO: the policy stage's DPO policy gives the token rewards
        if "policy" not in ctx.upstream:
            raise ValueError("rl.reward_source 'dpo_implicit' needs the policy stage's trained policy")
        beta = config.implicit_beta or float(ctx.upstream["policy"].config["loss"]["beta"])
        implicit = {"implicit_model_dir": ctx.upstream_dir("policy"), "implicit_beta": beta}
    trust = ctx.remote_code_allowed(reference, reward_dir, *implicit.values())
    if implicit:
        implicit["implicit_model_dir"] = trained_model_folder(implicit["implicit_model_dir"], trust)
    trainer = RLTrainer(
        reference,
        reward_dir,
        prompts.column("prompt").to_pylist(),
        config,
        rm_max_length=reward_model.config.get("max_length", 512),
        checkpoint_dir=ctx.checkpoint_dir,
        on_step=lambda step, metrics: ctx.run.log_metrics(metrics, step=step),
        progress=ctx.progress,
        trust_remote_code=trust,
        compute=ctx.compute,
        **implicit,
    )
    history = trainer.train()
    model_out, adapter_out = trained_outputs(ctx.writer.dir, config.lora)
    save_trained_lm(trainer.model, config.lora is not None, trainer.model_dir, model_out, adapter_out, trust)

    content, timings = split_timings(history)
    ctx.writer.write_table("train_log", history_table(content))
    ctx.writer.write_table("train_timings", history_table(timings), volatile=True)
    ctx.writer.write_table("samples", pa.Table.from_pylist(trainer.samples))
    ctx.run.log_rows(trainer.samples[-50:], "rl/samples.json")
    ctx.run.log_figure(reward_figure(history), "rl/reward_curve.png")
    ctx.log_model_location((model_out or adapter_out).name)
    Checkpoint(ctx.checkpoint_dir).remove()
    first, last = history[0], history[-1]
    metrics = {
        "iterations": len(history),
        "samples": int(last["samples"]),
        "initial_reward": first["reward"],
        "final_reward": last["reward"],
        "final_kl": last["kl"],
        "tokens_per_s": float(np.median([h["tokens_per_s"] for h in history])),
    }
    if "gold" in last:
        metrics.update(initial_gold=first["gold"], final_gold=last["gold"])
    method = f"{config.algorithm} ({config.reward_source})"
    write_trained_cards(
        ctx,
        [f for f in (model_out, adapter_out) if f],
        base_model=ctx.reference_model,
        title=f"{method} RL policy",
        tags=[config.algorithm, "rlhf", *(["abc"] if "abc" in config.reward_source else [])],
        metadata={"method": method, "kl_coef": config.kl_coef, "abc_beta": config.abc_beta},
        metrics=metrics,
    )
    return metrics


class RLTrainer(Trainer):
    """PPO / RLOO / GRPO of ``model_dir`` on ``prompts`` against the reward model in ``reward_model_dir`` (and the
    user's reward functions; ``implicit_model_dir`` is the DPO policy of ``reward_source: dpo_implicit``)."""

    def __init__(
        self,
        model_dir: str | Path,
        reward_model_dir: str | Path,
        prompts: list[Messages],
        config: RLConfig,
        *,
        rm_max_length: int = 512,
        checkpoint_dir: str | Path | None = None,
        on_step: StepCallback | None = None,
        progress: bool = True,
        trust_remote_code: bool = False,
        compute: ComputeConfig | None = None,
        implicit_model_dir: str | Path | None = None,
        implicit_beta: float | None = None,
    ):
        self.config, self.prompts, self.model_dir = config, prompts, Path(model_dir)
        self.on_step, self.progress = on_step, progress
        self.trust_remote_code, self.compute = trust_remote_code, compute
        self.device = resolve_device()
        self.tokenizer = load_generation_tokenizer(model_dir, trust_remote_code)
        self.pad_id = pad_token_id(self.tokenizer)

        torch.manual_seed(config.seed)
        self.model, self.lm = load_policy_model(model_dir, config, self.device, trust_remote_code)
        if config.disable_dropout:
            disable_dropout(self.model)  # the LoRA adapters' too
        self.stop_ids = stop_token_ids(self.lm, self.tokenizer)
        self.frozen_reference = None
        if config.lora is None:  # LoRA runs read pi_ref through disabled adapters
            reference = load_reference_model(model_dir, self.device, torch.float32, trust_remote_code)
            self.frozen_reference = reference.requires_grad_(False)
        self.value_head = None
        if config.algorithm == "ppo":
            self.value_head = torch.nn.Linear(self.lm.config.hidden_size, 1).to(self.device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        self.rewards = TokenRewards(
            Path(reward_model_dir),
            config,
            self.device,
            rm_max_length,
            trust_remote_code,
            implicit_model_dir=Path(implicit_model_dir) if implicit_model_dir else None,
            implicit_beta=config.implicit_beta or implicit_beta or 0.1,
        )
        self.gold = load_gold_scorer(config.gold_scorer) if config.gold_scorer else None

        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if self.value_head is not None:
            self.trainable.update({f"value_head.{n}": p for n, p in self.value_head.named_parameters()})
        self.optimizer = adamw(self.trainable, config.learning_rate, config.weight_decay, self.device)
        per_epoch = math.ceil(len(prompts) / config.batch_size)
        self.iterations = min(per_epoch * config.epochs, config.max_steps or per_epoch * config.epochs)
        steps = self.iterations * config.ppo_epochs * config.minibatches
        self.scheduler = cosine_schedule(self.optimizer, warmup_steps(config.warmup_ratio, steps), steps)
        # Prompt order: one seeded permutation per pass, concatenated; iteration i takes the next batch_size.
        passes = math.ceil(self.iterations * config.batch_size / len(prompts))
        generator = torch.Generator().manual_seed(config.seed)
        self.order = torch.cat([torch.randperm(len(prompts), generator=generator) for _ in range(passes)]).tolist()
        self.kl = AdaptiveKL(config.kl_coef, config.kl_target, config.kl_horizon)
        self.iteration, self.history, self.samples = 0, [], []
        self.checkpoint = Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        self.resume()

    def identity(self) -> dict:
        return {"config": self.config.model_dump(), "prompts": len(self.prompts)}

    def progress_state(self) -> dict:
        return {"step": self.iteration, "history": self.history, "samples": self.samples, "kl_coef": self.kl.value}

    def restore(self, state: dict) -> None:
        self.iteration, self.history, self.samples = state["step"], state["history"], state["samples"]
        self.kl.value = state["kl_coef"]

    @contextmanager
    def reference(self):
        """pi_ref as a causal LM: the frozen copy, or the policy with its LoRA adapters disabled."""
        if self.frozen_reference is not None:
            yield self.frozen_reference
        else:
            with self.model.disable_adapter():
                yield self.lm

    def train(self) -> list[dict[str, float]]:
        bar = tqdm(total=self.iterations, initial=self.iteration, desc="rl", unit="iter", disable=not self.progress)
        with self._rollout_workers() as samplers:
            while self.iteration < self.iterations:
                metrics = self._iteration(self.iteration, samplers)
                self.iteration += 1
                self.history.append({"step": self.iteration, **metrics})
                bar.update(1)
                due = self.iteration % self.config.save_every == 0 and self.iteration < self.iterations
                if self.checkpoint and due:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self.iteration, metrics)
        bar.close()
        return self.history

    @contextmanager
    def _rollout_workers(self):
        """Ray actors holding copies of the policy for the whole run (``compute.backend: ray``), else None: the
        base model loads once per run, and each iteration only pushes the trainable weights."""
        if not uses_ray(self.compute):
            yield None
            return
        shards = math.ceil(self.config.batch_size / self.config.sampling.batch_size)  # per iteration
        settings = self.config.model_dump(mode="json")  # picklable, stage-free
        build = partial(RolloutSampler, str(self.model_dir), settings, self.trust_remote_code)
        with ray_session(self.compute), RayWorkers(build, self.compute, min(self.compute.workers, shards)) as workers:
            yield workers

    # -- one iteration: sample, score, advantages, PPO epochs ------------------------------------------------

    def _rollouts(self, iteration: int, samplers: RayWorkers | None = None) -> list[Rollout]:
        config = self.config
        start = iteration * config.batch_size
        prompts = [self.prompts[i] for i in self.order[start : start + config.batch_size]]
        seed, step = config.sampling.seed + iteration, config.sampling.batch_size
        # A shard is one generate() call (sampling.batch_size prompts) wherever it runs, so the seeds never depend
        # on the worker count.
        if samplers is None:
            sampling = config.sampling.model_copy(update={"seed": seed})
            self.model.eval()
            # Sampling reseeds torch; the fork keeps the trainer's own stream (LoRA dropout) as it is on Ray.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                k = config.samples_per_prompt
                sampled = sample_token_ids(self.model, self.tokenizer, prompts, k, sampling, False, 0, step)
            self.model.train()
        else:
            samplers.update({n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad})
            shards = [(seed, i, prompts[s : s + step]) for i, s in enumerate(range(0, len(prompts), step))]
            done: list[list[Rollouts]] = [[] for _ in shards]
            samplers.map(shards, done.__setitem__)
            sampled = [row for shard in done for row in shard]
        rollouts = []
        for prompt, row in zip(prompts, sampled):
            for ids in row.completions:
                truncated = ids[-1] not in self.stop_ids  # cut at max_new_tokens, not stopped by the policy
                rollouts.append(Rollout(prompt, row.prompt_ids, ids, *token_spans(self.tokenizer, ids), truncated))
        return rollouts

    def _layout(self, rollouts: list[Rollout]) -> PromptGroups:
        """The rollouts as prompt groups: each prompt's forward runs once for its k completions."""
        prompts, completions = [r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts]
        return PromptGroups.of(prompts, completions, self.pad_id, self.device)

    def _forward(self, layout: PromptGroups) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(log-probs [B, T], values [B, T] or None, the hidden states predicting each completion token)."""
        with autocast(self.device, self.config.bf16):
            states = token_states(self.lm.base_model, layout)
            logp = layout.scatter(states_logprobs(self.lm, states, layout.labels, self.config.chunk_size))
        values = None
        if self.value_head is not None:
            values = layout.scatter(self.value_head(states.float())[:, 0])
        return logp, values, states

    @contextmanager
    def _behaviour_mode(self):
        """The policy as it sampled: eval mode (no dropout) for old log-probs, values, the KL and the rewards."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def _single_step(self) -> bool:
        """Whether each batch of rollouts gets exactly one optimizer step, in one pass, from a policy without dropout:
        then the training forward computes the behaviour policy's log-probs too, and no separate pass runs (as TRL
        does when ``num_iterations`` is 1)."""
        config = self.config
        one_step = config.ppo_epochs == config.minibatches == config.grad_accum == 1
        return one_step and (config.disable_dropout or config.lora is None)  # the base model's dropout is always off

    def _iteration(self, iteration: int, samplers: RayWorkers | None = None) -> dict[str, float]:
        config = self.config
        started = time.perf_counter()
        rollouts = self._rollouts(iteration, samplers)
        layout = self._layout(rollouts)
        mask = layout.completion_mask.float()
        single_step = self._single_step()
        with torch.no_grad(), self._behaviour_mode():
            with self.reference() as reference, autocast(self.device, config.bf16):
                ref_logps = grouped_logprobs(reference, layout, config.chunk_size)
                rewards = self.rewards(rollouts, reference, self.tokenizer, ref_logps)
            ref_logp = layout.scatter(torch.cat(ref_logps))
            behaviour = None if single_step else self._forward(layout)
        forward = self._forward(layout) if single_step else None  # the optimizer step's own, kept for it
        old_logp, old_values, states = (None if t is None else t.detach() for t in forward or behaviour)
        with torch.no_grad():
            entropy = masked_mean(layout.scatter(states_entropy(self.lm, states, config.chunk_size)), mask)
        truncated = torch.tensor([r.truncated for r in rollouts], device=self.device)
        if config.truncated == "penalize":
            rewards.scores = [s - config.truncation_penalty * t for s, t in zip(rewards.scores, truncated.tolist())]
        kl = (old_logp - ref_logp) * mask
        kl_in_reward = self.kl.value * kl if config.kl_penalty == "reward" else torch.zeros_like(kl)
        advantages, returns = self._advantages(rewards, layout, kl_in_reward, old_values)
        whiten_advantages = config.whiten_advantages
        if whiten_advantages if whiten_advantages is not None else config.algorithm != "grpo":
            advantages = whiten(advantages, mask)
        keep = (~truncated).float() if config.truncated == "mask" else torch.ones(len(rollouts), device=self.device)
        batch = {"old_logp": old_logp, "ref_logp": ref_logp, "values": old_values, "advantages": advantages}
        batch.update(returns=returns, keep=keep, mask=mask)

        sums: dict[str, float] = {}
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
        for _ in range(config.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=generator).tolist()
            for minibatch in np.array_split(order, config.minibatches):
                step = self._optimizer_step(rollouts, minibatch.tolist(), batch, forward)
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + value / (config.ppo_epochs * config.minibatches)
        self.kl.update(float(kl.sum(1).mean()), len(rollouts))

        gold = self.gold([r.prompt for r in rollouts], [r.text for r in rollouts]) if self.gold else None
        for i, r in enumerate(rollouts):
            self.samples.append(
                {
                    "iteration": iteration + 1,
                    "prompt": r.prompt[-1]["content"],
                    "completion": r.text,
                    "reward": rewards.scores[i],
                    "gold": float(gold[i]) if gold is not None else None,
                    "tokens": len(r.completion_ids),
                    "stopped": not r.truncated,
                }
            )
        seconds = time.perf_counter() - started
        metrics = {
            "reward": float(np.mean(rewards.scores)),
            **{f"reward/{name}": float(np.mean(values)) for name, values in rewards.parts.items()},
            "token_credit_sum": float(np.mean([c.sum() for c in rewards.credit])),
            "truncated_fraction": float(truncated.float().mean()),
            "kl": float(kl.sum(1).mean()),
            "kl_coef": self.kl.value,
            "entropy": float(entropy),
            "response_length": float(mask.sum(1).mean()),
            "samples": float((iteration + 1) * len(rollouts)),
            "lr": self.scheduler.get_last_lr()[0],
            **sums,
            "tokens_per_s": layout.tokens() / seconds,
            "seconds": seconds,
        }
        fallbacks = rewards.fallbacks
        if "abc" in config.reward_source:
            metrics["abc_fallback_fraction"] = fallbacks / len(rollouts)
            if fallbacks:
                logger.warning(
                    "rl iteration %d: %d of %d rollouts got the sparse reward (the reward model saw no response "
                    "token: empty, or cut by its max_length)",
                    iteration + 1,
                    fallbacks,
                    len(rollouts),
                )
        if gold is not None:
            metrics["gold"] = float(np.mean(gold))
        return metrics

    def _advantages(
        self, rewards: RolloutRewards, layout: PromptGroups, kl_in_reward: torch.Tensor, values: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages [B, T], returns for the value loss or None) of the configured algorithm."""
        config, mask, k = self.config, layout.completion_mask.float(), self.config.samples_per_prompt
        if config.algorithm == "grpo":
            outcome = torch.tensor(rewards.scores, device=self.device) - kl_in_reward.sum(1)
            advantages = group_advantages(outcome, k, config.scale_rewards)[:, None] * mask
            if config.reward_source != "sparse" and config.credit_weight > 0:
                credit = layout.scatter(torch.from_numpy(np.concatenate(rewards.credit)).to(self.device))
                advantages = advantages + config.credit_weight * group_token_credit(credit, mask, k)
            return advantages, None
        per_token = np.concatenate([rewards.token_rewards(i) for i in range(len(rewards.scores))])
        token_rewards = layout.scatter(torch.from_numpy(per_token).to(self.device)) - kl_in_reward
        if config.algorithm == "ppo":
            return gae(token_rewards, values, mask, config.gamma, config.lam)
        return RLOO_ADVANTAGES[config.algorithm](token_rewards, mask, k), None

    def _optimizer_step(
        self, rollouts: list[Rollout], rows: list[int], batch: dict, forward: tuple | None = None
    ) -> dict[str, float]:
        """One optimizer step over the rollouts ``rows``, in ``grad_accum`` micro-batches, each weighted by its
        share of the step's loss normalizer (tokens for dapo, rows for grpo and dr_grpo). ``forward``: the
        iteration's training forward of every rollout (``_single_step``), else each micro-batch runs its own."""
        config = self.config
        keep = batch["keep"]
        total_tokens = max(sum(len(rollouts[i].completion_ids) * float(keep[i]) for i in rows), 1.0)
        high = config.clip_range_high or config.clip_range
        sums = {"policy_loss": 0.0, "clip_fraction": 0.0}
        if self.value_head is not None:
            sums.update(value_loss=0.0, value_clip_fraction=0.0)
        if config.kl_penalty == "loss":
            sums["kl_loss"] = 0.0
        for micro in np.array_split(np.asarray(rows), config.grad_accum):
            micro = micro.tolist()
            if forward is None:
                logp, values, _ = self._forward(self._layout([rollouts[i] for i in micro]))
            else:
                logp, values = forward[0][micro], None if forward[1] is None else forward[1][micro]
            width = logp.shape[1]
            mask = batch["mask"][micro, :width] * keep[micro, None]
            token_share = float(mask.sum()) / total_tokens
            share = token_share if config.loss_type == "dapo" else len(micro) / len(rows)
            old, adv = batch["old_logp"][micro, :width], batch["advantages"][micro, :width]
            per_token, clipped = clipped_policy_loss(logp, old, adv, config.clip_range, high)
            if config.kl_penalty == "loss":
                kl = k3_kl(logp, batch["ref_logp"][micro, :width], old)
                per_token = per_token + self.kl.value * kl
                sums["kl_loss"] += float(masked_mean(kl.detach(), mask)) * token_share
            loss = aggregate_loss(per_token, mask, config.loss_type, config.sampling.max_new_tokens) * share
            sums["policy_loss"] += float(loss.detach())
            sums["clip_fraction"] += float(masked_mean(clipped.float(), mask)) * token_share
            if values is not None:
                v_old, v_target = batch["values"][micro, :width], batch["returns"][micro, :width]
                v_loss, v_clipped = value_loss(values, v_old, v_target, mask, config.value_clip)
                loss = loss + config.vf_coef * v_loss * token_share
                sums["value_loss"] += float(v_loss.detach()) * token_share
                sums["value_clip_fraction"] += float(v_clipped) * token_share
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            list(self.trainable.values()), config.max_grad_norm if config.max_grad_norm else math.inf
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**sums, "grad_norm": float(norm)}


class RolloutSampler:
    """One copy of the policy on a Ray actor, built as the trainer builds its own (same base folder, LoRA wrapper
    and dtype); each iteration it loads the trainer's trainable weights (``update``), then samples shards of that
    iteration's prompts: (seed, shard index, prompts) -> their :class:`Rollouts`."""

    def __init__(self, model_dir: str, config: dict, trust_remote_code: bool = False):
        self.config = RLConfig.model_validate(config)
        self.tokenizer = load_generation_tokenizer(model_dir, trust_remote_code)
        model, _ = load_policy_model(model_dir, self.config, resolve_device(), trust_remote_code)
        self.model = model.eval()
        self.trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}

    def update(self, weights: dict[str, torch.Tensor]) -> None:
        unexpected = self.model.load_state_dict(weights, strict=False).unexpected_keys
        missing = self.trainable - weights.keys()
        if unexpected or missing:
            raise ValueError(
                f"rl: the pushed weights do not match the rollout policy's trainable parameters "
                f"(unexpected {sorted(unexpected)[:3]}, missing {sorted(missing)[:3]})"
            )

    def __call__(self, shard: tuple[int, int, list[Messages]]) -> list[Rollouts]:
        seed, index, prompts = shard  # one whole shard: its seed is shard_seed(seed, index), as in the trainer
        sampling = self.config.sampling.model_copy(update={"seed": seed})
        k = self.config.samples_per_prompt
        return sample_token_ids(self.model, self.tokenizer, prompts, k, sampling, False, index, len(prompts))


def reward_figure(history: list[dict[str, float]]):
    """Reward (and gold) vs samples, and KL to pi_ref."""
    fig, (left, right) = new_figure(2, (10, 3.5))
    samples = [h["samples"] for h in history]
    left.plot(samples, [h["reward"] for h in history], label="reward model", marker="o", ms=3)
    if "gold" in history[0]:
        left.plot(samples, [h["gold"] for h in history], label="gold", marker="o", ms=3)
    left.set_xlabel("samples")
    left.set_title("reward of the rollouts")
    left.legend(loc="lower right")
    right.plot(samples, [h["kl"] for h in history], color="#c0504d")
    right.set_xlabel("samples")
    right.set_title("KL(pi || pi_ref) per rollout")
    return finish(fig)
