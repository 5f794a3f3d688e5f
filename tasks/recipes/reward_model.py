"""Stage 2: a Bradley-Terry reward model on the curated pairs.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` on any local backbone (decoder LMs read the
reward at the last non-pad token, encoders at CLS). Loss (Bradley & Terry 1952; Ouyang et al. 2022; the margin
variant from Touvron et al. 2023, Llama 2; centering from Eisenstein et al. 2023, as TRL's
``center_rewards_coefficient``):

    L = mean_b[ -log sigmoid(r_c - r_r - m_b) ] + c * mean_b[ (r_c + r_r)^2 ]

with m_b the curated score margin when ``use_margin`` is set (else 0) and c the centering coefficient.
Training checkpoints (weights, optimizer, scheduler, RNG, step; tasks/train/checkpoint.py) are written atomically every
``save_every`` steps, so an interrupted run resumes on the same data order and reaches the same weights.
``num_processes`` > 1 or ``strategy: fsdp`` trains under torchrun like the policy stage: DDP, or FSDP2 over the
backbone's blocks with sharded (DCP) checkpoints and one consolidated safetensors folder at the end
(tasks/train/fsdp.py).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from creditflow.tasks.configs import TINY_BACKBONE, RewardModelConfig
from creditflow.tasks.data.schema import SIDES, Messages, split_rows
from creditflow.tasks.infer.reward_scoring import encode_for_reward, load_reward_model, reward_batch, score_pairs
from creditflow.tasks.models.model_card import stage_config, stage_datasets, write_card
from creditflow.tasks.models.precision import autocast, resolve_device
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.tiny import build_tiny_reward_backbone
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.stage import StageContext
from creditflow.tasks.train import fsdp
from creditflow.tasks.train.checkpoint import Checkpoint, resume_training_state, save_training_state
from creditflow.tasks.train.launch import launch_folder, launch_torchrun
from creditflow.tasks.train.metrics import StepCallback
from creditflow.tasks.train.optim import adamw, cosine_schedule, total_steps, warmup_steps


def bradley_terry_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - m), averaged, plus c * mean((r_c + r_r)^2) when centering."""
    logits = rewards_chosen - rewards_rejected
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((rewards_chosen + rewards_rejected) ** 2).mean()
    return loss


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclass
class PairData:
    prompts: list[Messages]
    chosen: list[Messages]
    rejected: list[Messages]
    margins: list[float]

    @classmethod
    def from_table(cls, table: pa.Table) -> "PairData":
        margins = [m if m is not None else 0.0 for m in table.column("margin").to_pylist()]
        return cls(
            table.column("prompt").to_pylist(),
            table.column("chosen").to_pylist(),
            table.column("rejected").to_pylist(),
            margins,
        )

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class EvalResult:
    accuracy: float
    mean_margin: float
    rewards_chosen: list[float]
    rewards_rejected: list[float]

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        chosen = torch.tensor(self.rewards_chosen or [0.0])
        rejected = torch.tensor(self.rewards_rejected or [0.0])
        return {
            f"{prefix}.accuracy": self.accuracy,
            f"{prefix}.margin": self.mean_margin,
            f"{prefix}.reward_chosen": chosen.mean().item(),
            f"{prefix}.reward_rejected": rejected.mean().item(),
            f"{prefix}.reward_std": torch.cat([chosen, rejected]).std().item() if len(self.rewards_chosen) else 0.0,
        }


def evaluate(model, tokenizer, data: PairData, config: RewardModelConfig, device=None) -> EvalResult:
    if not len(data):
        return EvalResult(float("nan"), float("nan"), [], [])
    was_training = model.training
    model.eval()
    chosen, rejected = (
        score_pairs(model, tokenizer, data.prompts, side, config.max_length, config.eval_batch_size, device)
        for side in (data.chosen, data.rejected)
    )
    model.train(was_training)
    wins = [c > r for c, r in zip(chosen, rejected)]
    return EvalResult(
        accuracy=sum(wins) / len(wins),
        mean_margin=sum(c - r for c, r in zip(chosen, rejected)) / len(wins),
        rewards_chosen=chosen,
        rewards_rejected=rejected,
    )


def _accumulate(module, tokenizer, encoded, train: PairData, rows: list[int], n_pairs: int, world: int, config, device):
    """Backward of one micro-batch's share of the step's mean loss over ``n_pairs`` (times ``world``: DDP and FSDP
    average gradients over the processes); returns (loss sum, wins, margin sum)."""
    with autocast(device, config.bf16):
        r_c, r_r = (
            module(**reward_batch(encoded[side], rows, tokenizer.pad_token_id, device)).logits[:, 0].float()
            for side in SIDES
        )
    margin = torch.tensor([train.margins[i] for i in rows], device=device) if config.use_margin else None
    loss = bradley_terry_loss(r_c, r_r, margin, config.center_rewards_coefficient)
    (loss * len(rows) * world / n_pairs).backward()
    return torch.tensor([loss.item() * len(rows), (r_c > r_r).sum().item(), (r_c - r_r).sum().item()])


def train_reward_model(
    model_dir: str | Path,
    train: PairData,
    evaluation: PairData,
    config: RewardModelConfig,
    checkpoint_dir: str | Path | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
):
    """Train from ``model_dir``; returns (tokenizer, model, history of per-epoch eval metrics).

    Under torchrun (``num_processes`` > 1, or ``strategy: fsdp``) every step's micro-batches are dealt out to the
    processes in turn (DDP, or FSDP2 over the backbone's blocks), so N processes take the same steps as one process
    with ``grad_accum`` x N; an epoch's last micro-batches that cannot give every process one are dropped. One
    function rather than a trainer class: the loop is short, and it reads top to bottom."""
    device = resolve_device()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sharded = config.strategy == "fsdp"
    torch.manual_seed(config.seed)  # the fresh reward head's initialization, the same on every process
    tokenizer, model = load_reward_model(model_dir, device, trust_remote_code)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if sharded:  # before the optimizer is built: it must hold the sharded parameters
        fsdp.shard(model, model, device, config.bf16, config.fsdp_cpu_offload)
    module = model
    if world > 1 and not sharded:
        device_ids = [device.index] if device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    encoded = {
        side: encode_for_reward(tokenizer, train.prompts, getattr(train, side), config.max_length) for side in SIDES
    }
    micro_per_epoch = -(-len(train) // config.batch_size) // world * world
    if micro_per_epoch == 0:
        raise ValueError(f"reward_model: {len(train)} pairs make no micro-batch for each of {world} processes")
    per_step = config.grad_accum * world
    steps_per_epoch = -(-micro_per_epoch // per_step)
    total = total_steps(micro_per_epoch, per_step, config.epochs, config.max_steps)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = adamw(trainable, config.learning_rate, config.weight_decay, device)
    scheduler = cosine_schedule(optimizer, warmup_steps(config.warmup_ratio, total), total)

    checkpoint = Checkpoint(checkpoint_dir, rank) if checkpoint_dir is not None else None
    identity = {"config": config.model_dump(), "world": world}
    step = 0
    if checkpoint is not None and checkpoint.latest() is not None:
        step = _resume(checkpoint, model, trainable, optimizer, scheduler, identity, sharded)
    resumed_at = step
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=step, desc="reward model", unit="step", disable=not progress or rank, leave=False)
    for epoch in range(config.epochs):
        if step >= total:
            break
        if (epoch + 1) * steps_per_epoch <= resumed_at:
            continue  # finished (and evaluated) before the checkpoint
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
        micro_batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        micro_batches = micro_batches[:micro_per_epoch]
        for first in range(0, len(micro_batches), per_step):
            if epoch * steps_per_epoch + first // per_step < step:
                continue  # already done before the checkpoint we resumed from
            if step >= total:
                break
            group = micro_batches[first : first + per_step]
            n_pairs = sum(len(rows) for rows in group)
            mine = group[rank::world]
            stats = sum(
                _accumulate(module, tokenizer, encoded, train, rows, n_pairs, world, config, device) for rows in mine
            )
            if world > 1:
                dist.all_reduce(stats)
            clip = config.max_grad_norm or math.inf
            grad_norm = fsdp.total_norm(torch.nn.utils.clip_grad_norm_(list(trainable.values()), clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            metrics = {
                "train.loss": stats[0].item() / n_pairs,
                "train.accuracy": stats[1].item() / n_pairs,
                "train.margin": stats[2].item() / n_pairs,
                "train.grad_norm": grad_norm,
                "train.lr": scheduler.get_last_lr()[0],
                "train.epoch": epoch + (first + len(group)) / len(micro_batches),
            }
            if on_step and rank == 0:
                on_step(step, metrics)
            if checkpoint is not None and step % config.save_every == 0 and step < total:
                _save(checkpoint, model, trainable, optimizer, scheduler, identity, sharded, step)
        epoch_eval = evaluate(model, tokenizer, evaluation, config, device).metrics()  # every process: FSDP gathers
        history.append({"epoch": epoch + 1, **epoch_eval})
        if on_step and rank == 0:
            on_step(step, {f"epoch_{k}": v for k, v in epoch_eval.items()})
    bar.close()
    model.eval()
    return tokenizer, model, history


def _save(checkpoint, model, trainable, optimizer, scheduler, identity, sharded: bool, step: int) -> None:
    if sharded:  # every process writes its shards of weights and optimizer state (DCP)
        state = {"scheduler": scheduler.state_dict(), **identity, "step": step}
        checkpoint.save({}, state, write_shards=lambda folder: fsdp.save_sharded(folder, model, optimizer))
    else:
        save_training_state(checkpoint, trainable, optimizer, scheduler, identity, step=step)


def _resume(checkpoint, model, trainable, optimizer, scheduler, identity, sharded: bool) -> int:
    if sharded:
        folder = checkpoint.latest()
        _, state = checkpoint.load(identity)
        fsdp.load_sharded(folder, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
    else:
        state = resume_training_state(checkpoint, trainable, optimizer, scheduler, identity)
    return state["step"]


def save_reward_model(
    model, tokenizer, base: str | Path, out_dir: str | Path, sharded: bool, trust_remote_code: bool = False
) -> None:
    """The trained model and tokenizer as an HF folder, written by rank 0 (FSDP: the shards gathered once into a
    fresh unsharded copy on CPU). Every process must call it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if sharded:
        full = fsdp.full_state_dict(model)
        if rank == 0:
            _, model = load_reward_model(base, torch.device("cpu"), trust_remote_code)
            model.load_state_dict(full)
    if rank == 0:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    if dist.is_initialized():
        dist.barrier()


def launch_distributed(
    base: str | Path,
    train: PairData,
    evaluation: PairData,
    config: RewardModelConfig,
    output_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    on_step: StepCallback | None = None,
    launch_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> list[dict[str, float]]:
    """Train under torchrun (:func:`run_worker` in each of ``config.num_processes`` processes per node, on
    ``config.nnodes`` nodes) and save the model to ``output_dir``; returns the per-epoch eval history."""
    paths = {"model_dir": base, "checkpoint_dir": checkpoint_dir, "output_dir": output_dir}
    write_pairs = lambda path: path.write_text(json.dumps({"train": asdict(train), "eval": asdict(evaluation)}))  # noqa: E731
    files = {"pairs": write_pairs}
    return launch_torchrun("reward_model", config, paths, files, on_step, launch_dir, trust_remote_code)


def run_worker(spec: dict, on_step: StepCallback) -> list[dict[str, float]]:
    """One torchrun process of :func:`launch_distributed` (tasks/train/torchrun_worker.py): train, then save."""
    config = RewardModelConfig.model_validate(spec["config"])
    pairs = json.loads(Path(spec["pairs"]).read_text())
    train, evaluation = PairData(**pairs["train"]), PairData(**pairs["eval"])
    trust = spec["trust_remote_code"]
    tokenizer, model, history = train_reward_model(
        spec["model_dir"], train, evaluation, config, spec["checkpoint_dir"], on_step, False, trust
    )
    save_reward_model(model, tokenizer, spec["model_dir"], spec["output_dir"], config.strategy == "fsdp", trust)
    return history


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def _build_tiny_backbone(folder: Path, pairs: PairData, seed: int) -> Path:
    corpus = [m["content"] for rows in (pairs.prompts, pairs.chosen, pairs.rejected) for conv in rows for m in conv]
    return build_tiny_reward_backbone(folder, corpus, seed=seed)


def compute_reward_model(ctx: StageContext) -> dict[str, float]:
    """Train on the curated train split, evaluate on eval, save ``model/`` (safetensors + tokenizer)."""

    config: RewardModelConfig = ctx.config
    pairs = ctx.read_upstream("curate", "pairs")
    train = PairData.from_table(split_rows(pairs, "train"))
    evaluation_table = split_rows(pairs, "eval")
    evaluation = PairData.from_table(evaluation_table)
    if not len(train):
        raise ValueError("reward_model: the curated data has no train pairs")

    if config.base_model == TINY_BACKBONE:
        base = _build_tiny_backbone(ctx.writer.dir / "base", train, config.seed)
    else:
        base = resolve_model(config.base_model)
    trust = ctx.remote_code_allowed(base)

    def log_step(step: int, metrics: dict[str, float]) -> None:
        ctx.run.log_metrics(metrics, step=step)

    model_dir = ctx.writer.dir / "model"
    if config.in_process:
        tokenizer, model, history = train_reward_model(
            base,
            train,
            evaluation,
            config,
            checkpoint_dir=ctx.checkpoint_dir,
            on_step=log_step,
            progress=ctx.progress,
            trust_remote_code=trust,
        )
        save_reward_model(model, tokenizer, base, model_dir, sharded=False, trust_remote_code=trust)
    else:
        history = launch_distributed(
            base,
            train,
            evaluation,
            config,
            model_dir,
            checkpoint_dir=ctx.checkpoint_dir,
            on_step=log_step,
            launch_dir=launch_folder(ctx.checkpoint_dir),
            trust_remote_code=trust,
        )
        tokenizer, model = load_reward_model(model_dir, trust_remote_code=trust)
    if config.base_model == TINY_BACKBONE:
        shutil.rmtree(ctx.writer.dir / "base")

    final = evaluate(model, tokenizer, evaluation, config)
    ctx.writer.write_table(
        "eval_scores",
        pa.table(
            {
                "pair_id": evaluation_table.column("pair_id"),
                "reward_chosen": pa.array(final.rewards_chosen, pa.float32()),
                "reward_rejected": pa.array(final.rewards_rejected, pa.float32()),
            }
        ),
    )
    fig = _reward_figure(final)
    ctx.run.log_figure(fig, "reward_model/eval_rewards.png")
    ctx.run.log_dict(history, "reward_model/eval_history.json")
    ctx.log_model_location("model")
    Checkpoint(ctx.checkpoint_dir).remove()  # the published artifact supersedes it
    metrics = {
        **final.metrics(),
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    write_card(
        model_dir,
        title="Bradley-Terry reward model",
        summary="A scalar reward head trained with CreditFlow on chosen/rejected pairs: "
        "loss = -log sigmoid(r(x, y_w) - r(x, y_l)).",
        base_model=config.base_model,
        datasets=stage_datasets(ctx),
        tags=["reward-model", "bradley-terry"],
        metadata={"method": "bradley-terry"},
        metrics=metrics,
        config=stage_config(ctx),
        pipeline_tag="text-classification",
    )
    return metrics


def _reward_figure(result: EvalResult):
    fig, (left, right) = new_figure(2, (10, 3.5))
    left.hist([result.rewards_chosen, result.rewards_rejected], bins=30, label=["chosen", "rejected"])
    left.set_title("eval rewards")
    left.legend(loc="upper right")
    margins = [c - r for c, r in zip(result.rewards_chosen, result.rewards_rejected)]
    right.hist(margins, bins=30, color="#4f81bd")
    right.axvline(0, color="black", lw=1)
    right.set_title(f"r_chosen - r_rejected (accuracy {result.accuracy:.3f})")
    return finish(fig)
