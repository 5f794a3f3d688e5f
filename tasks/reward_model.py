"""Stage 2: a Bradley-Terry reward model on the curated pairs.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` on any local backbone (decoder LMs read the
reward at the last non-pad token, encoders at CLS). Loss (Bradley & Terry 1952; Ouyang et al. 2022; the margin
variant from Touvron et al. 2023, Llama 2; centering from Eisenstein et al. 2023, as TRL's
``center_rewards_coefficient``):

    L = mean_b[ -log sigmoid(r_c - r_r - m_b) ] + c * mean_b[ (r_c + r_r)^2 ]

with m_b the curated score margin when ``use_margin`` is set (else 0) and c the centering coefficient.
Training checkpoints (weights, optimizer, scheduler, RNG, step; tasks/training.py) are written atomically every
``save_every`` steps, so an interrupted run resumes on the same data order and reaches the same weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from creditflow.tasks import training
from creditflow.tasks.configs import TINY_BACKBONE, RewardModelConfig
from creditflow.tasks.model_card import stage_config, stage_datasets, write_card
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.reward_scoring import encode_for_reward, load_reward_model, reward_batch, score_pairs
from creditflow.tasks.schema import SIDES, Messages, split_rows
from creditflow.tasks.stage import StageContext


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


def evaluate(model, tokenizer, data: PairData, config: RewardModelConfig) -> EvalResult:
    if not len(data):
        return EvalResult(float("nan"), float("nan"), [], [])
    was_training = model.training
    model.eval()
    chosen, rejected = (
        score_pairs(model, tokenizer, data.prompts, side, config.max_length, config.eval_batch_size)
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


def _accumulate(model, tokenizer, encoded, train: PairData, rows: list[int], n_pairs: int, config) -> torch.Tensor:
    """Backward of one micro-batch's share of the step's mean loss; returns (loss sum, wins, margin sum)."""
    device = next(model.parameters()).device
    with training.autocast(device, config.bf16):
        r_c, r_r = (
            model(**reward_batch(encoded[side], rows, tokenizer.pad_token_id, device)).logits[:, 0].float()
            for side in SIDES
        )
    margin = torch.tensor([train.margins[i] for i in rows], device=device) if config.use_margin else None
    loss = bradley_terry_loss(r_c, r_r, margin, config.center_rewards_coefficient)
    (loss * len(rows) / n_pairs).backward()
    return torch.tensor([loss.item() * len(rows), (r_c > r_r).sum().item(), (r_c - r_r).sum().item()])


def train_reward_model(
    model_dir: str | Path,
    train: PairData,
    evaluation: PairData,
    config: RewardModelConfig,
    checkpoint_dir: str | Path | None = None,
    on_step: training.StepCallback | None = None,
    progress: bool = True,
):
    """Train in place from ``model_dir``; returns (tokenizer, model, history of per-epoch eval metrics)."""
    device = training.resolve_device()
    torch.manual_seed(config.seed)  # the fresh reward head's initialization
    tokenizer, model = load_reward_model(model_dir, device)
    model.train()
    encoded = {
        side: encode_for_reward(tokenizer, train.prompts, getattr(train, side), config.max_length) for side in SIDES
    }
    micro_per_epoch = -(-len(train) // config.batch_size)
    steps_per_epoch = -(-micro_per_epoch // config.grad_accum)
    total = training.total_steps(micro_per_epoch, config.grad_accum, config.epochs, config.max_steps)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = training.adamw(trainable, config.learning_rate, config.weight_decay, device)
    scheduler = training.cosine_schedule(optimizer, training.warmup_steps(config.warmup_ratio, total), total)

    checkpoint = training.Checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    identity = {"config": config.model_dump()}
    step = 0
    if checkpoint is not None and checkpoint.latest() is not None:
        step = training.resume_training_state(checkpoint, trainable, optimizer, scheduler, identity)["step"]
    resumed_at = step
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=step, desc="reward model", unit="step", disable=not progress, leave=False)
    for epoch in range(config.epochs):
        if step >= total:
            break
        if (epoch + 1) * steps_per_epoch <= resumed_at:
            continue  # finished (and evaluated) before the checkpoint
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
        micro_batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for first in range(0, len(micro_batches), config.grad_accum):
            if epoch * steps_per_epoch + first // config.grad_accum < step:
                continue  # already done before the checkpoint we resumed from
            if step >= total:
                break
            group = micro_batches[first : first + config.grad_accum]
            n_pairs = sum(len(rows) for rows in group)
            stats = sum(_accumulate(model, tokenizer, encoded, train, rows, n_pairs, config) for rows in group)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            metrics = {
                "train.loss": stats[0].item() / n_pairs,
                "train.accuracy": stats[1].item() / n_pairs,
                "train.margin": stats[2].item() / n_pairs,
                "train.lr": scheduler.get_last_lr()[0],
                "train.epoch": epoch + (first + len(group)) / len(micro_batches),
            }
            if on_step:
                on_step(step, metrics)
            if checkpoint is not None and step % config.save_every == 0 and step < total:
                training.save_training_state(checkpoint, trainable, optimizer, scheduler, identity, step=step)
        epoch_eval = evaluate(model, tokenizer, evaluation, config).metrics()
        history.append({"epoch": epoch + 1, **epoch_eval})
        if on_step:
            on_step(step, {f"epoch_{k}": v for k, v in epoch_eval.items()})
    bar.close()
    model.eval()
    return tokenizer, model, history


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def _build_tiny_backbone(folder: Path, pairs: PairData, seed: int) -> Path:
    from creditflow.tasks.tiny import build_tiny_reward_backbone

    corpus = [m["content"] for rows in (pairs.prompts, pairs.chosen, pairs.rejected) for conv in rows for m in conv]
    return build_tiny_reward_backbone(folder, corpus, seed=seed)


def compute_reward_model(ctx: StageContext) -> dict[str, float]:
    """Train on the curated train split, evaluate on eval, save ``model/`` (safetensors + tokenizer)."""
    from creditflow.tasks.models import resolve_model

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

    def log_step(step: int, metrics: dict[str, float]) -> None:
        ctx.run.log_metrics(metrics, step=step)

    tokenizer, model, history = train_reward_model(
        base, train, evaluation, config, checkpoint_dir=ctx.checkpoint_dir, on_step=log_step, progress=ctx.progress
    )
    model_dir = ctx.writer.dir / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
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
    training.Checkpoint(ctx.checkpoint_dir).remove()  # the published artifact supersedes it
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
    )
    return metrics


def _reward_figure(result: EvalResult):
    fig, (left, right) = new_figure(2, (10, 3.5))
    left.hist([result.rewards_chosen, result.rewards_rejected], bins=30, label=["chosen", "rejected"])
    left.set_title("eval rewards")
    left.legend()
    margins = [c - r for c, r in zip(result.rewards_chosen, result.rewards_rejected)]
    right.hist(margins, bins=30, color="#4f81bd")
    right.axvline(0, color="black", lw=1)
    right.set_title(f"r_chosen - r_rejected (accuracy {result.accuracy:.3f})")
    return finish(fig)
