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
from creditflow.tasks.infer.reward_scoring import encode_for_reward, reward_batch, reward_values, score_pairs
from creditflow.tasks.models.loading import disable_dropout, load_reward_model
from creditflow.tasks.models.model_card import stage_config, stage_datasets, write_card
from creditflow.tasks.models.packing import pack_layout, packed_attention, packed_tensors
from creditflow.tasks.models.precision import autocast, resolve_device
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.tiny import build_tiny_reward_backbone
from creditflow.tasks.plots import finish, new_figure
from creditflow.tasks.stage import PRETRAINED_RECORD, StageContext
from creditflow.tasks.train import fsdp
from creditflow.tasks.train.checkpoint import Checkpoint
from creditflow.tasks.train.launch import launch_folder, launch_torchrun
from creditflow.tasks.train.metrics import StepCallback
from creditflow.tasks.train.optim import adamw, cosine_schedule, total_steps, warmup_steps
from creditflow.tasks.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_reward_model(ctx: StageContext) -> dict[str, float]:
    """Train on the curated train split, evaluate on eval, save ``model/`` (safetensors + tokenizer)."""

    config: RewardModelConfig = ctx.config
    pairs = ctx.read_upstream("curate", "pairs")
    train = PairData.from_table(split_rows(pairs, "train"))
    evaluation_table = split_rows(pairs, "eval")
    evaluation = PairData.from_table(evaluation_table)
    if config.pretrained is not None:
        return _use_pretrained(ctx, config, evaluation, evaluation_table)
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
        trainer = RewardModelTrainer(
            base,
            train,
            evaluation,
            config,
            checkpoint_dir=ctx.checkpoint_dir,
            on_step=log_step,
            progress=ctx.progress,
            trust_remote_code=trust,
        )
        history = trainer.train()
        trainer.save_pretrained(model_dir)
        tokenizer, model = trainer.tokenizer, trainer.model
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
    _publish_evaluation(ctx, final, evaluation_table)
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


def _use_pretrained(ctx: StageContext, config: RewardModelConfig, evaluation: PairData, table: pa.Table) -> dict:
    """``reward_model.pretrained``: no training. The model is evaluated on the eval split like a trained one, and
    the artifact records where it is (``PRETRAINED_RECORD``) instead of holding a copy of its weights; the
    fingerprint covers the resolved snapshot's weights and tokenizer (flows/registry.py)."""
    folder = resolve_model(config.pretrained)
    tokenizer, model = load_reward_model(folder, trust_remote_code=ctx.remote_code_allowed(folder))
    final = evaluate(model, tokenizer, evaluation, config)
    _publish_evaluation(ctx, final, table)
    ctx.writer.write_json(PRETRAINED_RECORD, {"pretrained": config.pretrained, "folder": str(folder.resolve())})
    ctx.run.set_tags({"creditflow.model_path": str(folder), "creditflow.pretrained_reward_model": config.pretrained})
    return {
        **final.metrics(),
        "train_pairs": 0,
        "eval_pairs": len(evaluation),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _publish_evaluation(ctx: StageContext, final: EvalResult, table: pa.Table) -> None:
    """The eval split's rewards (``eval_scores``) and their histogram, for a trained or a pretrained model."""
    chosen, rejected = (pa.array(values, pa.float32()) for values in (final.rewards_chosen, final.rewards_rejected))
    columns = {"pair_id": table.column("pair_id"), "reward_chosen": chosen, "reward_rejected": rejected}
    ctx.writer.write_table("eval_scores", pa.table(columns))
    ctx.run.log_figure(_reward_figure(final), "reward_model/eval_rewards.png")


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


class RewardModelTrainer(Trainer):
    """Bradley-Terry training of ``model_dir`` on ``train``, evaluated on ``evaluation`` after every epoch.

    Under torchrun (``num_processes`` > 1, or ``strategy: fsdp``) every step's micro-batches are dealt out to the
    processes in turn (DDP, or FSDP2 over the backbone's blocks), so N processes take the same steps as one process
    with ``grad_accum`` x N; an epoch's last micro-batches that cannot give every process one are dropped."""

    def __init__(
        self,
        model_dir: str | Path,
        train: PairData,
        evaluation: PairData,
        config: RewardModelConfig,
        *,
        checkpoint_dir: str | Path | None = None,
        on_step: StepCallback | None = None,
        progress: bool = True,
        trust_remote_code: bool = False,
    ):
        self.config, self.pairs, self.evaluation, self.model_dir = config, train, evaluation, Path(model_dir)
        self.on_step, self.progress, self.trust_remote_code = on_step, progress, trust_remote_code
        self.device = resolve_device()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.sharded = config.strategy == "fsdp"
        torch.manual_seed(config.seed)  # the fresh reward head's initialization, the same on every process
        attention = {"attn_implementation": packed_attention(self.device)} if config.packing else {}
        self.tokenizer, self.model = load_reward_model(model_dir, self.device, trust_remote_code, **attention)
        if config.disable_dropout:
            disable_dropout(self.model)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        if self.sharded:  # before the optimizer is built: it must hold the sharded parameters
            fsdp.shard(self.model, self.model, self.device, config.bf16, config.fsdp_cpu_offload)
            self.sharded_model = self.model
        self.module = PackedRewards(self.model) if config.packing else self.model
        if self.world > 1 and not self.sharded:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)
        self.encoded = {
            side: encode_for_reward(self.tokenizer, train.prompts, getattr(train, side), config.max_length)
            for side in SIDES
        }
        self.micro_per_epoch = -(-len(train) // config.batch_size) // self.world * self.world
        if self.micro_per_epoch == 0:
            raise ValueError(f"reward_model: {len(train)} pairs make no micro-batch for each of {self.world} processes")
        self.per_step = config.grad_accum * self.world
        self.steps_per_epoch = -(-self.micro_per_epoch // self.per_step)
        self.total_steps = total_steps(self.micro_per_epoch, self.per_step, config.epochs, config.max_steps)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = adamw(self.trainable, config.learning_rate, config.weight_decay, self.device)
        self.scheduler = cosine_schedule(
            self.optimizer, warmup_steps(config.warmup_ratio, self.total_steps), self.total_steps
        )
        self.step, self.history = 0, []  # history: the eval metrics of every epoch
        self.checkpoint = Checkpoint(checkpoint_dir, self.rank) if checkpoint_dir is not None else None
        self.resume()

    def identity(self) -> dict:
        return {"config": self.config.model_dump(), "world": self.world}

    def progress_state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = state["step"]

    def train(self) -> list[dict[str, float]]:
        """Run to ``total_steps`` (continuing a checkpoint if there is one); returns the per-epoch eval metrics."""
        config, rank, pairs = self.config, self.rank, self.pairs
        resumed_at = self.step
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="reward model",
            unit="step",
            disable=not self.progress or rank,
            leave=False,
        )
        for epoch in range(config.epochs):
            if self.step >= self.total_steps:
                break
            if (epoch + 1) * self.steps_per_epoch <= resumed_at:
                continue  # finished (and evaluated) before the checkpoint
            generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
            order = torch.randperm(len(pairs), generator=generator).tolist()
            micro_batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            micro_batches = micro_batches[: self.micro_per_epoch]
            for first in range(0, len(micro_batches), self.per_step):
                if epoch * self.steps_per_epoch + first // self.per_step < self.step:
                    continue  # already done before the checkpoint we resumed from
                if self.step >= self.total_steps:
                    break
                group = micro_batches[first : first + self.per_step]
                metrics = self._train_step(group)
                metrics["train.epoch"] = epoch + (first + len(group)) / len(micro_batches)
                self.step += 1
                bar.update(1)
                if self.on_step and rank == 0:
                    self.on_step(self.step, metrics)
                if self.checkpoint is not None and self.step % config.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            epoch_eval = evaluate(self.model, self.tokenizer, self.evaluation, config, self.device).metrics()
            self.history.append({"epoch": epoch + 1, **epoch_eval})  # every process evaluates: FSDP gathers
            if self.on_step and rank == 0:
                self.on_step(self.step, {f"epoch_{k}": v for k, v in epoch_eval.items()})
        bar.close()
        self.model.eval()
        return self.history

    def _train_step(self, group: list[list[int]]) -> dict[str, float]:
        """One optimizer step over ``group``'s micro-batches, dealt out to the processes in turn."""
        n_pairs = sum(len(rows) for rows in group)
        stats = sum(self._accumulate(rows, n_pairs) for rows in group[self.rank :: self.world])
        if self.world > 1:
            dist.all_reduce(stats)
        clip = self.config.max_grad_norm or math.inf
        grad_norm = fsdp.total_norm(torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "train.loss": stats[0].item() / n_pairs,
            "train.accuracy": stats[1].item() / n_pairs,
            "train.margin": stats[2].item() / n_pairs,
            "train.grad_norm": grad_norm,
            "train.lr": self.scheduler.get_last_lr()[0],
        }

    def _accumulate(self, rows: list[int], n_pairs: int) -> torch.Tensor:
        """Backward of one micro-batch's share of the step's mean loss over ``n_pairs`` (times ``world``: DDP and
        FSDP average gradients over the processes); returns (loss sum, wins, margin sum)."""
        pad_id, device = self.tokenizer.pad_token_id, self.device
        with autocast(device, self.config.bf16):
            if self.config.packing:  # chosen and rejected rows of the micro-batch in one packed forward
                sequences = [self.encoded[side]["input_ids"][i] for side in SIDES for i in rows]
                r_c, r_r = self.module(*packed_inputs(sequences, pad_id, self.config.packing_tokens, device)).split(
                    len(rows)
                )
            else:
                r_c, r_r = (
                    reward_values(self.module(**reward_batch(self.encoded[side], rows, pad_id, device)))
                    for side in SIDES
                )
        margin = torch.tensor([self.pairs.margins[i] for i in rows], device=device) if self.config.use_margin else None
        loss = bradley_terry_loss(r_c, r_r, margin, self.config.center_rewards_coefficient)
        (loss * len(rows) * self.world / n_pairs).backward()
        return torch.tensor([loss.item() * len(rows), (r_c > r_r).sum().item(), (r_c - r_r).sum().item()])

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The trained model and tokenizer as an HF folder, written by rank 0 (FSDP: the shards gathered once into
        a fresh unsharded copy on CPU). Every process must call it."""
        model = self.model
        if self.sharded:
            full = fsdp.full_state_dict(model)
            if self.rank == 0:
                _, model = load_reward_model(self.model_dir, torch.device("cpu"), self.trust_remote_code)
                model.load_state_dict(full)
        if self.rank == 0:
            model.save_pretrained(str(out_dir), safe_serialization=True)
            self.tokenizer.save_pretrained(str(out_dir))
        if dist.is_initialized():
            dist.barrier()


class PackedRewards(torch.nn.Module):
    """A decoder reward model over packed rows (tasks/models/packing.py): its score head on the hidden state of each
    sequence's last token, where the padded sequence classifier reads it. What DDP wraps when packing."""

    def __init__(self, model):
        super().__init__()
        if not hasattr(model, "score"):  # decoder classifiers' head; encoders (BERT, DeBERTa) have a `classifier`
            raise ValueError(
                f"reward_model.packing needs a decoder reward model with a score head; {type(model).__name__} is not "
                "one (an encoder attends both ways, so position ids cannot mark where its sequences end)"
            )
        self.model = model

    def forward(self, input_ids, position_ids, rows, cols) -> torch.Tensor:
        hidden = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return self.model.score(hidden.last_hidden_state[rows, cols])[:, 0].float()


def packed_inputs(sequences: list[list[int]], pad_id: int, budget: int | None, device) -> tuple[torch.Tensor, ...]:
    """(input_ids, position_ids, row, column of each sequence's last token) for :class:`PackedRewards`."""
    layout = pack_layout([len(ids) for ids in sequences], budget)
    input_ids, position_ids = packed_tensors(sequences, layout, pad_id)
    last = [start + len(ids) - 1 for ids, start in zip(sequences, layout.starts)]
    return tuple(t.to(device) for t in (input_ids, position_ids, torch.tensor(layout.rows), torch.tensor(last)))


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
    trainer = RewardModelTrainer(
        spec["model_dir"],
        train,
        evaluation,
        config,
        checkpoint_dir=spec["checkpoint_dir"],
        on_step=on_step,
        progress=False,
        trust_remote_code=spec["trust_remote_code"],
    )
    history = trainer.train()
    trainer.save_pretrained(spec["output_dir"])
    return history


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def _build_tiny_backbone(folder: Path, pairs: PairData, seed: int) -> Path:
    corpus = [m["content"] for rows in (pairs.prompts, pairs.chosen, pairs.rejected) for conv in rows for m in conv]
    return build_tiny_reward_backbone(folder, corpus, seed=seed)


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
