"""Stage 4: preference optimization of the policy (DPO / IPO / SimPO) with the T-REG token-level regularizer.

Losses (tasks/losses/preference.py): DPO (Rafailov et al. 2023, "Direct Preference Optimization"),
IPO (Azar et al. 2023),
SimPO (Meng, Xia, Chen 2024), each optionally with T-REG (Zhou, Zhang, Zhao, Meng 2024, "T-REG: Preference
Optimization with Token-Level Reward Regularization", arXiv 2412.02685):

    L = L_seq + alpha * sg(w) * (L_REG(y_w) + L_REG(y_l)),    L_REG(y) = -beta * sum_t r_hat_t * log pi(y_t | x, y_<t)

The token rewards r_hat come from the token-reward stage: T-REG contrastive prompting, or Attention-Based Credit
(Chan et al. 2024, "Dense Reward for Free in RLHF") projected onto the policy's tokens. The policy starts from that
stage's reference model, whose log-probs of every completion token are stored next to r_hat, so training runs no
reference forward. The trainer re-tokenizes every pair with ``tokenization.encode_pair`` and refuses to train if the
ids differ from the stored ones: the rewards and reference log-probs would be misaligned.

One step: chosen and rejected rows of every pair go through the model in one forward (2B rows, right padded);
log-probs of completion tokens only are computed chunk by chunk from the final hidden states under activation
checkpointing (:func:`training_logprobs`), so no [rows, seq, vocab] tensor is ever materialized, in forward or
backward. AdamW, cosine schedule with warmup, gradient accumulation, clipping; optional LoRA (Hu et al. 2021) merged
into the saved model and/or saved as a PEFT adapter; ``num_processes > 1`` runs the same trainer under torchrun
with DDP.

Checkpoints (trainable weights as safetensors; optimizer, scheduler, RNG, step, data position and metric history)
are written atomically every ``save_every`` steps, so a killed run resumes and continues the same loss curve.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from creditflow.tasks.config_base import precision_mode
from creditflow.tasks.configs import PolicyConfig, method_label
from creditflow.tasks.data.schema import split_rows
from creditflow.tasks.losses.preference import preference_loss, token_reward_correlation
from creditflow.tasks.models.causal_lm import save_trained_lm, trained_outputs
from creditflow.tasks.models.loading import load_policy_model, load_tokenizer
from creditflow.tasks.models.logprobs import CompletionLogprobs
from creditflow.tasks.models.model_card import write_trained_cards
from creditflow.tasks.models.packing import packed_attention
from creditflow.tasks.models.precision import REFERENCE_PRECISION_FILE, Precision, compute_precision, resolve_device
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.tokenization import pad_token_id
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.train import fsdp
from creditflow.tasks.train.checkpoint import Checkpoint
from creditflow.tasks.train.launch import launch_folder, launch_torchrun
from creditflow.tasks.train.metrics import StepCallback, history_table, peak_memory_gb, split_timings
from creditflow.tasks.train.optim import adamw, cosine_schedule, total_steps, warmup_steps
from creditflow.tasks.train.preference_batches import (
    SHAPE_BUCKET,
    Batch,
    PolicyExample,
    build_examples,
    collate,
    epoch_batches,
)
from creditflow.tasks.train.trainer import Trainer

if TYPE_CHECKING:  # importing it pulls in MLflow, which torchrun workers never need
    from creditflow.tasks.stage import StageContext

logger = logging.getLogger(__name__)
# Step-0 |log π − log π_ref| per completion token (nats) past which the reference is taken to be scored at another
# precision. Same-precision rescoring on other batch shapes stays far below it (tests/test_precision.py measures).
REFERENCE_GAP_TOLERANCE = 5e-4
METRIC_NAMES = {  # LossOutput.metrics() -> our metric names (no "/": they are also train_log columns)
    "loss": "loss",
    "sequence_loss": "sequence_loss",
    "regularizer": "regularizer",
    "weight": "mean_w",
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margin": "rewards_margin",
    "rewards/accuracy": "rewards_accuracy",
}


# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


# Stage entry point: setup, run, save


def compute_policy(ctx: StageContext) -> dict[str, float]:
    """Train the token-reward stage's reference model on the train pairs; write ``model/`` (and/or the LoRA
    ``adapter/``) and ``train_log``."""

    config: PolicyConfig = ctx.config
    knobs = ctx.upstream["token_rewards"].config
    try:
        model_dir = resolve_model(knobs["reference_model"])
        tokenization = {k: knobs[k] for k in ("max_length", "max_prompt_length", "truncation", "abc_beta")}
    except KeyError as exc:
        raise ValueError(f"policy: the token_rewards manifest config has no {exc} (an older artifact?)") from None
    trust = ctx.remote_code_allowed(model_dir)
    pairs = ctx.read_upstream("onpolicy" if "onpolicy" in ctx.upstream else "curate", "pairs")
    train = split_rows(pairs, "train")
    if not train.num_rows:
        raise ValueError("policy: the pairs have no train split")
    table = ctx.read_upstream("token_rewards", "token_rewards")
    _check_reference_precision(ctx, config)
    tokenizer = load_tokenizer(str(model_dir), trust)
    examples = build_examples(tokenizer, train, table, config.token_reward_source, **tokenization)

    logged: set[int] = set()

    def log_step(step: int, metrics: dict[str, float]) -> None:
        ctx.run.log_metrics(metrics, step=step)
        logged.add(step)

    model_out, adapter_out = trained_outputs(ctx.writer.dir, config.lora)
    if config.in_process:
        trainer = PolicyTrainer(
            model_dir,
            examples,
            config,
            checkpoint_dir=ctx.checkpoint_dir,
            on_step=log_step,
            progress=ctx.progress,
            trust_remote_code=trust,
        )
        history = trainer.train()
        trainer.save_pretrained(model_out, adapter_out)
        del trainer
    else:
        history = launch_distributed(
            model_dir,
            examples,
            config,
            model_out,
            adapter_dir=adapter_out,
            checkpoint_dir=ctx.checkpoint_dir,
            on_step=log_step,
            launch_dir=launch_folder(ctx.checkpoint_dir),
            trust_remote_code=trust,
        )
    for entry in history:  # steps restored from a checkpoint were logged by the run that made them
        if entry["step"] not in logged:
            ctx.run.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    content, timings = split_timings(history)
    ctx.writer.write_table("train_log", history_table(content))
    ctx.writer.write_table("train_timings", history_table(timings), volatile=True)
    ctx.run.log_figure(loss_figure(history), "policy/loss_curve.png")
    ctx.log_model_location((model_out or adapter_out).name)
    Checkpoint(ctx.checkpoint_dir).remove()  # the published artifact supersedes it (and its .old copy)
    last = history[-1]
    metrics = {
        "train_pairs": len(examples),
        "steps": len(history),
        "final_loss": last["loss"],
        "final_rewards_accuracy": last["rewards_accuracy"],
        "final_rewards_margin": last["rewards_margin"],
        "tokens_per_s": sorted(h["tokens_per_s"] for h in history)[len(history) // 2],
        "peak_memory_gb": max(h["peak_memory_gb"] for h in history),
    }
    if "token_reward_corr" in last:  # token rewards vs the policy's implicit token rewards, at the last step
        metrics["final_token_reward_corr"] = last["token_reward_corr"]
    loss = config.loss
    write_trained_cards(
        ctx,
        [f for f in (model_out, adapter_out) if f],
        base_model=knobs["reference_model"],
        title=f"{method_label(config.model_dump())} policy",
        tags=[loss.loss_type, *(["t-reg"] if loss.alpha else [])],
        metadata={
            "method": method_label(config.model_dump()),
            "loss": loss.loss_type,
            "beta": loss.beta,
            "alpha": loss.alpha,
            "token_reward_source": config.token_reward_source,
        },
        metrics=metrics,
    )
    return metrics


def _check_reference_precision(ctx: StageContext, config: PolicyConfig) -> None:
    """Warn, naming the artifact, when the token-reward stage scored the reference at another precision than this
    policy computes with: log π − log π_ref is then not 0 at step 0, and DPO starts from a margin it did not learn."""
    manifest = ctx.upstream["token_rewards"]
    if REFERENCE_PRECISION_FILE not in manifest.outputs:  # an older artifact, or one without contrastive rows
        return
    record = json.loads(ctx.workspace.store.file(manifest, REFERENCE_PRECISION_FILE).read_text())
    scored, computes = record["reference_logps"], compute_precision(precision_mode(config), resolve_device()).label
    if scored != computes:
        logger.warning(
            "policy: token_rewards artifact %s scored the reference log-probs at %s, but this policy computes at %s, "
            "so the DPO margin does not start at 0; recompute token_rewards with dtype: auto (it follows the policy "
            "section)",
            manifest.fingerprint,
            scored,
            computes,
        )
        ctx.run.set_tags({"creditflow.reference_precision": f"{scored} (policy: {computes})"})


def launch_distributed(
    model_dir: str | Path,
    examples: list[PolicyExample],
    config: PolicyConfig,
    output_dir: str | Path | None,
    adapter_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    on_step: StepCallback | None = None,
    launch_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> list[dict[str, float]]:
    """Train with ``config.num_processes`` torchrun workers per node (:func:`run_worker` in each) on
    ``config.nnodes`` nodes (the others join through ``launch_dir``); returns the history."""
    paths = {
        "model_dir": model_dir,
        "checkpoint_dir": checkpoint_dir,
        "output_dir": output_dir,
        "adapter_dir": adapter_dir,
    }
    write_examples = lambda path: torch.save([asdict(e) for e in examples], path)  # noqa: E731
    files = {"examples": write_examples}
    return launch_torchrun("policy", config, paths, files, on_step, launch_dir, trust_remote_code)


def run_worker(spec: dict, on_step: StepCallback) -> list[dict[str, float]]:
    """One torchrun process of :func:`launch_distributed` (tasks/train/torchrun_worker.py): train, then save."""
    config = PolicyConfig.model_validate(spec["config"])
    examples = [PolicyExample.from_dict(e) for e in torch.load(spec["examples"], weights_only=True)]
    trainer = PolicyTrainer(
        spec["model_dir"],
        examples,
        config,
        checkpoint_dir=spec["checkpoint_dir"],
        on_step=on_step,
        progress=False,
        trust_remote_code=spec["trust_remote_code"],
    )
    history = trainer.train()
    trainer.save_pretrained(spec["output_dir"], spec["adapter_dir"])
    return history


# ---------------------------------------------------------------------------------------------------------
# The trainer


class PolicyTrainer(Trainer):
    """Preference optimization of ``model_dir`` on ``examples``; DDP when launched under torchrun."""

    def __init__(
        self,
        model_dir: str | Path,
        examples: list[PolicyExample],
        config: PolicyConfig,
        *,
        checkpoint_dir: str | Path | None = None,
        on_step: StepCallback | None = None,
        progress: bool = True,
        trust_remote_code: bool = False,
        precision: Precision | None = None,
    ):
        """``precision``: default, the config's on this device (``config_base.precision_mode``); tests pass bf16
        ones on CPU."""
        if not examples:
            raise ValueError("policy: no training pairs")
        if config.loss.alpha > 0 and examples[0].chosen.rewards is None:
            raise ValueError("policy: loss.alpha > 0 needs token rewards (token_reward_source is none)")
        self.config, self.examples, self.model_dir = config, examples, Path(model_dir)
        self.on_step, self.progress, self.trust_remote_code = on_step, progress, trust_remote_code
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = resolve_device()
        self.precision = precision or compute_precision(precision_mode(config), self.device)
        self.pad_multiple = SHAPE_BUCKET if self.device.type == "cuda" or config.compile else 1

        self.fsdp = config.strategy == "fsdp"
        if self.fsdp and not dist.is_initialized():
            raise ValueError("policy.strategy 'fsdp' runs under torchrun (compute_policy launches it)")
        torch.manual_seed(config.seed)  # LoRA initialization: the same on every rank (DDP also broadcasts it)
        attention = packed_attention(self.device) if config.packing else "sdpa"
        self.model, self.lm = load_policy_model(
            model_dir, config, self.device, trust_remote_code, self.precision, attention
        )
        self.pad_id = pad_token_id(load_tokenizer(str(model_dir), trust_remote_code))
        module = CompletionLogprobs(self.lm, config.chunk_size)
        if self.fsdp:  # before the optimizer is built: it must hold the sharded parameters
            fsdp.shard(module, self.lm, self.device, config.bf16, config.fsdp_cpu_offload)
        if config.compile:  # the decoder, in place (its state dict keeps its names); the LM-head chunks stay eager
            self.lm.base_model.compile()
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = adamw(self.trainable, config.learning_rate, config.weight_decay, self.device)
        self.lengths = [e.length for e in examples]
        micro_per_epoch = len(epoch_batches(self.lengths, config.batch_size, 0, 0, False, self.world))
        if micro_per_epoch == 0:
            raise ValueError(f"policy: {len(examples)} pairs make no micro-batch for each of {self.world} processes")
        self.per_step = config.grad_accum * self.world
        self.total_steps = total_steps(micro_per_epoch, self.per_step, config.epochs, config.max_steps)
        warmup = warmup_steps(config.warmup_ratio, self.total_steps)
        self.scheduler = cosine_schedule(self.optimizer, warmup, self.total_steps)
        self.step, self.position, self.history = 0, (0, 0), []
        self.sharded_model = module if self.fsdp else None
        self.checkpoint = Checkpoint(checkpoint_dir, self.rank) if checkpoint_dir is not None else None
        self.resumed_from = self.step if self.resume() else 0
        if not self.resumed_from:
            torch.manual_seed(config.seed + self.rank)  # distinct dropout masks per process
        if self.world > 1 and not self.fsdp:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        self.module = module

    def train(self) -> list[dict[str, float]]:
        """Run to ``total_steps`` (continuing a checkpoint if there is one); returns the metrics of every step."""
        config = self.config
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="policy",
            unit="step",
            disable=not self.progress or self.rank != 0,
            leave=False,
        )
        start_epoch, start_batch = self.position
        step0 = self.reference_gap() if self.step == 0 else {}
        for epoch in range(start_epoch, config.epochs):
            batches = epoch_batches(
                self.lengths, config.batch_size, config.seed, epoch, config.length_grouped, self.world
            )
            for first in range(start_batch if epoch == start_epoch else 0, len(batches), self.per_step):
                if self.step >= self.total_steps:
                    break
                metrics = {**self._train_step(batches[first : first + self.per_step]), **step0}
                step0 = {}
                self.step += 1
                self.position = (epoch, first + self.per_step)
                metrics["epoch"] = epoch + min(first + self.per_step, len(batches)) / len(batches)
                self.history.append({"step": self.step, **metrics})
                bar.update(1)
                if self.checkpoint and self.step % config.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.on_step is not None and self.rank == 0:
                    self.on_step(self.step, metrics)
        bar.close()
        return self.history

    def _train_step(self, group: list[list[int]]) -> dict[str, float]:
        """One optimizer step over ``group`` (micro-batches of the whole world; this rank takes every world-th)."""
        started = time.perf_counter()
        n_pairs = sum(len(rows) for rows in group)
        mine = group[self.rank :: self.world]
        sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64)  # pair-weighted metrics, then tokens
        logps, refs, targets = [], [], []
        lr = self.scheduler.get_last_lr()[0]
        for i, rows in enumerate(mine):
            batch = self._collate(rows)
            last = i == len(mine) - 1
            if self.fsdp:  # reduce-scatter gradients only after the step's last micro-batch
                self.module.set_requires_gradient_sync(last)
            with nullcontext() if last or self.world == 1 or self.fsdp else self.module.no_sync():
                logp = self._logps(batch)
                out = self._loss(batch, logp)
                # Scaled so that the gradient (averaged over processes by DDP) is the mean over the step's pairs.
                (out.loss * len(rows) * self.world / n_pairs).backward()
            values = out.metrics()
            sums[:-1] += torch.tensor([values[k] for k in METRIC_NAMES], dtype=torch.float64) * len(rows)
            sums[-1] += batch.tokens
            if batch.rewards is not None:
                keep = batch.mask.bool()
                logps.append(logp.detach()[keep].cpu())
                refs.append(batch.ref_logps[keep].cpu())
                targets.append(batch.rewards[keep].cpu())
        norm = self.config.max_grad_norm or float("inf")
        grad_norm = fsdp.total_norm(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        peak = torch.tensor([peak_memory_gb(self.device)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            gathered = [None] * self.world
            dist.all_gather_object(gathered, (logps, refs, targets))
            logps, refs, targets = ([t for part in gathered for t in part[k]] for k in range(3))
        metrics = {name: (sums[i] / n_pairs).item() for i, name in enumerate(METRIC_NAMES.values())}
        if logps:  # over every real token of the step, chosen and rejected
            logp, ref, target = torch.cat(logps), torch.cat(refs), torch.cat(targets)
            beta = self.config.loss.beta
            metrics["token_reward_corr"] = token_reward_correlation(logp, ref, torch.ones_like(logp), target, beta)
        metrics.update(
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=sums[-1].item() / (time.perf_counter() - started),
            peak_memory_gb=peak.item(),
        )
        return metrics

    def _collate(self, rows: list[int]) -> Batch:
        examples = [self.examples[j] for j in rows]
        config = self.config
        return collate(examples, self.pad_id, self.device, self.pad_multiple, config.packing, config.packing_tokens)

    def _logps(self, batch: Batch) -> torch.Tensor:
        """[2B, T] log-probs of every completion token (0 past each completion's end)."""
        with self.precision.autocast(self.device):
            flat = self.module(batch.input_ids, batch.attention_mask, batch.rows, batch.cols, batch.position_ids)
        return flat.new_zeros(batch.mask.shape).index_put((batch.sides, batch.index), flat)

    @torch.no_grad()
    def reference_gap(self) -> dict[str, float]:
        """At step 0 the policy is the reference, so DPO's z = β[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)]
        starts at 0 when the stored reference log-probs were scored at this trainer's precision: kernels on other
        batch shapes only round differently. Measured on this process's first micro-batch with dropout off (LoRA's
        adapter dropout would differ from the reference by design); a gap past REFERENCE_GAP_TOLERANCE warns."""
        first = epoch_batches(self.lengths, self.config.batch_size, self.config.seed, 0, self.config.length_grouped)
        batch = self._collate(first[self.rank % len(first)])
        self.model.eval()
        logp = self._logps(batch)
        self.model.train()
        gap = (logp - batch.ref_logps) * batch.mask
        per_side, b = gap.sum(-1), batch.pairs
        report = {
            "step0_logp_gap": (gap.abs().sum() / batch.mask.sum()).item(),
            "step0_max_abs_z": (self.config.loss.beta * (per_side[:b] - per_side[b:])).abs().max().item(),
        }
        if report["step0_logp_gap"] > REFERENCE_GAP_TOLERANCE and self.rank == 0:
            logger.warning(
                "policy: at step 0 log π differs from the stored log π_ref by %.2g nats per token (tolerance %.0e; "
                "max |z| %.3g): the reference log-probs were not scored at this policy's precision (%s). "
                "token_rewards.dtype: auto scores them at it",
                report["step0_logp_gap"],
                REFERENCE_GAP_TOLERANCE,
                report["step0_max_abs_z"],
                self.precision.label,
            )
        return report

    def _loss(self, batch: Batch, logp: torch.Tensor):
        b = batch.pairs
        rewards = (batch.rewards[:b], batch.rewards[b:]) if batch.rewards is not None else (None, None)
        return preference_loss(
            self.config.loss,
            logp[:b],
            logp[b:],
            batch.mask[:b],
            batch.mask[b:],
            batch.ref_logps[:b],
            batch.ref_logps[b:],
            *rewards,
        )

    def save_pretrained(self, out_dir: str | Path | None, adapter_dir: str | Path | None = None) -> None:
        """The trained model (LoRA merged) and its tokenizer, to ``out_dir`` and/or, as the PEFT adapter alone, to
        ``adapter_dir``; written by rank 0."""
        lora = self.config.lora is not None
        if self.fsdp:  # gather the shards once, into a fresh unsharded copy on rank 0's CPU
            full = fsdp.full_state_dict(self.module)
            if self.rank == 0:
                model, lm = load_policy_model(self.model_dir, self.config, torch.device("cpu"), self.trust_remote_code)
                missing, unexpected = lm.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, False)
                if unexpected or set(missing) - {"lm_head.weight"}:  # a tied LM head is not stored twice
                    raise RuntimeError(f"FSDP state dict does not match the model: {missing[:3]} {unexpected[:3]}")
                save_trained_lm(model, lora, self.model_dir, out_dir, adapter_dir, self.trust_remote_code)
        elif self.rank == 0:
            save_trained_lm(self.model, lora, self.model_dir, out_dir, adapter_dir, self.trust_remote_code)
        if self.world > 1:
            dist.barrier()

    # -- checkpoints: what identifies this run, and where it stands --------------------------------------

    def identity(self) -> dict:
        return {"config": self.config.model_dump(), "world": self.world}

    def progress_state(self) -> dict:
        return {"step": self.step, "position": list(self.position), "history": self.history}

    def restore(self, state: dict) -> None:
        self.step, self.position, self.history = state["step"], tuple(state["position"]), state["history"]


# ---------------------------------------------------------------------------------------------------------
# Outputs


def loss_figure(history: list[dict[str, float]]):
    steps = [h["step"] for h in history]
    fig, (left, right) = new_figure(2, (10, 3.5))
    for name in ("loss", "sequence_loss", "regularizer"):
        left.plot(steps, [h[name] for h in history], label=name)
    left.set_xlabel("step")
    left.set_title("training loss")
    left.legend(loc="upper right")
    right.plot(steps, [h["rewards_accuracy"] for h in history], label="reward accuracy")
    right.plot(steps, [h["rewards_margin"] for h in history], label="reward margin")
    right.set_xlabel("step")
    right.set_title("implicit rewards")
    right.legend(loc="upper left")
    return finish(fig)
