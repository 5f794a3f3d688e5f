"""Stage 2: a Bradley-Terry reward model on the curated pairs.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` on any local backbone (decoder LMs read the
reward at the last non-pad token, encoders at CLS). Loss (Bradley & Terry 1952; Ouyang et al. 2022; the margin
variant from Touvron et al. 2023, Llama 2; centering from Eisenstein et al. 2023, as TRL's
``center_rewards_coefficient``):

    L = mean_b[ -log sigmoid(r_c - r_r - m_b) ] + c * mean_b[ (r_c + r_r)^2 ]

with m_b the curated score margin when ``use_margin`` is set (else 0) and c the centering coefficient.
Training checkpoints (weights, optimizer, scheduler, RNG, step) are written atomically every ``save_every``
steps, so an interrupted run resumes on the same data order and reaches the same weights.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_cosine_schedule_with_warmup

from creditflow.tasks.schema import Messages, completion_text, split_rows
from creditflow.tasks.stage import StageContext

TINY = "tiny"  # build a tiny backbone from the curated text: the offline fallback, and what tests use


@dataclass
class RewardModelConfig:
    base_model: str = TINY  # local folder, a named model ("minilm"), or "tiny"
    max_length: int = 256  # tokens of prompt + response; long prompts are cut from the left
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; caps epochs
    batch_size: int = 8  # pairs per micro-batch (chosen and rejected go through one forward)
    grad_accum: int = 1
    use_margin: bool = False  # subtract the curated score margin inside the sigmoid
    center_rewards_coefficient: float | None = None
    seed: int = 0
    bf16: bool = True  # on CUDA only; CPU trains in fp32
    eval_batch_size: int = 32
    save_every: int = 50  # optimizer steps between resumable checkpoints

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("reward_model.batch_size, grad_accum and epochs must be >= 1")


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
# Tokenization and scoring


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encode_for_reward(tokenizer, prompts: list[Messages], completions: list[Messages], max_length: int) -> dict:
    """Token ids the reward model sees for (prompt, completion).

    With a chat template the whole conversation is rendered and the prompt side is cut from the left when too long
    (the reward is read at the end). Without one (encoders such as MiniLM) the prompt and response are a text pair.
    """
    if tokenizer.chat_template:
        texts = tokenizer.apply_chat_template(
            [p + c for p, c in zip(prompts, completions)], tokenize=False, add_generation_prompt=False
        )
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left"
        try:
            return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
        finally:
            tokenizer.truncation_side = side
    prompt_texts = ["\n\n".join(m["content"] for m in p) for p in prompts]
    return tokenizer(
        prompt_texts,
        [completion_text(c) for c in completions],
        truncation="longest_first",
        max_length=max_length,
    )


def _collate(encoded: dict, rows: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(encoded["input_ids"][i]) for i in rows)
    batch: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key not in encoded:
            continue
        fill = pad_id if key == "input_ids" else 0
        values = [encoded[key][i] + [fill] * (width - len(encoded[key][i])) for i in rows]
        batch[key] = torch.tensor(values, dtype=torch.long, device=device)
    return batch


def load_reward_model(folder: str | Path, device: torch.device | None = None):
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    _ensure_pad(tokenizer, model)
    return tokenizer, model.to(device or _device()).eval()


def _ensure_pad(tokenizer, model) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder classifiers find the read-out token through the pad id; it must be set on the config.
    model.config.pad_token_id = tokenizer.pad_token_id


class RewardScorer:
    """Batch of (prompt, completion) -> scalar rewards, for evaluation, on-policy relabeling and ABC."""

    def __init__(self, folder: str | Path, max_length: int = 512, batch_size: int = 32, device: str | None = None):
        self.device = torch.device(device) if device else _device()
        self.tokenizer, self.model = load_reward_model(folder, self.device)
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: list[Messages], completions: list[Messages]) -> list[float]:
        return _score(self.model, self.tokenizer, prompts, completions, self.max_length, self.batch_size, self.device)


@torch.no_grad()
def _score(model, tokenizer, prompts, completions, max_length, batch_size, device) -> list[float]:
    encoded = encode_for_reward(tokenizer, prompts, completions, max_length)
    # Longest first keeps padding low; results go back to input order.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded["input_ids"][i]))
    scores = [0.0] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = _collate(encoded, rows, tokenizer.pad_token_id, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            rewards = model(**batch).logits[:, 0].float().tolist()
        for i, reward in zip(rows, rewards):
            scores[i] = reward
    return scores


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


def evaluate(model, tokenizer, data: PairData, config: RewardModelConfig, device: torch.device) -> EvalResult:
    if not len(data):
        return EvalResult(float("nan"), float("nan"), [], [])
    was_training = model.training
    model.eval()
    score = lambda side: _score(model, tokenizer, data.prompts, side, config.max_length, config.eval_batch_size, device)  # noqa: E731
    chosen, rejected = score(data.chosen), score(data.rejected)
    model.train(was_training)
    wins = [c > r for c, r in zip(chosen, rejected)]
    return EvalResult(
        accuracy=sum(wins) / len(wins),
        mean_margin=sum(c - r for c, r in zip(chosen, rejected)) / len(wins),
        rewards_chosen=chosen,
        rewards_rejected=rejected,
    )


StepCallback = Callable[[int, dict[str, float]], None]


def train_reward_model(
    model_dir: str | Path,
    train: PairData,
    evaluation: PairData,
    config: RewardModelConfig,
    checkpoint_dir: str | Path | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
):
    """Train in place from ``model_dir``; returns (tokenizer, model, history of per-epoch eval metrics)."""
    device = _device()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    _ensure_pad(tokenizer, model)
    model.to(device).train()

    encoded = {
        side: encode_for_reward(tokenizer, train.prompts, getattr(train, side), config.max_length)
        for side in ("chosen", "rejected")
    }
    micro_per_epoch = math.ceil(len(train) / config.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)

    step = 0
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "state.pt").is_file():
        step = _load_checkpoint(Path(checkpoint_dir), model, optimizer, scheduler)
    resumed_at = step
    use_bf16 = config.bf16 and device.type == "cuda"
    history: list[dict[str, float]] = []
    bar = tqdm(total=total_steps, initial=step, desc="reward model", unit="step", disable=not progress, leave=False)
    for epoch in range(config.epochs):
        if step >= total_steps:
            break
        if (epoch + 1) * steps_per_epoch <= resumed_at:
            continue  # finished (and evaluated) before the checkpoint
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)).tolist()
        micro_batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
        for first in range(0, len(micro_batches), config.grad_accum):
            global_index = epoch * steps_per_epoch + first // config.grad_accum
            if global_index < step:
                continue  # already done before the checkpoint we resumed from
            if step >= total_steps:
                break
            group = micro_batches[first : first + config.grad_accum]
            n_pairs = sum(len(rows) for rows in group)
            stats = torch.zeros(3)
            for rows in group:
                chosen = _collate(encoded["chosen"], rows, tokenizer.pad_token_id, device)
                rejected = _collate(encoded["rejected"], rows, tokenizer.pad_token_id, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    r_c = model(**chosen).logits[:, 0].float()
                    r_r = model(**rejected).logits[:, 0].float()
                margin = torch.tensor([train.margins[i] for i in rows], device=device) if config.use_margin else None
                loss = bradley_terry_loss(r_c, r_r, margin, config.center_rewards_coefficient)
                (loss * len(rows) / n_pairs).backward()
                stats += torch.tensor([loss.item() * len(rows), (r_c > r_r).sum().item(), (r_c - r_r).sum().item()])
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
            if checkpoint_dir is not None and step % config.save_every == 0 and step < total_steps:
                _save_checkpoint(Path(checkpoint_dir), model, optimizer, scheduler, step)
        epoch_eval = evaluate(model, tokenizer, evaluation, config, device).metrics()
        history.append({"epoch": epoch + 1, **epoch_eval})
        if on_step:
            on_step(step, {f"epoch_{k}": v for k, v in epoch_eval.items()})
    bar.close()
    model.eval()
    return tokenizer, model, history


def _save_checkpoint(folder: Path, model, optimizer, scheduler, step: int) -> None:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        tmp / "state.pt",
    )
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, model, optimizer, scheduler) -> int:
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def base_model_folder(spec: str) -> Path:
    """A local folder for a backbone spec (a path, or a name resolved by tasks/models.py)."""
    from creditflow.tasks.models import resolve_model

    return resolve_model(spec)


def _build_tiny_backbone(folder: Path, pairs: PairData, seed: int) -> Path:
    from creditflow.tasks.tiny import build_tiny_reward_backbone

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

    if config.base_model == TINY:
        base = _build_tiny_backbone(ctx.writer.dir / "base", train, config.seed)
    else:
        base = base_model_folder(config.base_model)

    def log_step(step: int, metrics: dict[str, float]) -> None:
        ctx.run.log_metrics(metrics, step=step)

    tokenizer, model, history = train_reward_model(
        base, train, evaluation, config, checkpoint_dir=ctx.checkpoint_dir, on_step=log_step, progress=ctx.progress
    )
    model_dir = ctx.writer.dir / "model"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    if config.base_model == TINY:
        shutil.rmtree(ctx.writer.dir / "base")

    final = evaluate(model, tokenizer, evaluation, config, next(model.parameters()).device)
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
    ctx.run.log_artifacts([model_dir], "reward_model")
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # the published artifact supersedes it
    return {
        **final.metrics(),
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _reward_figure(result: EvalResult):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.hist([result.rewards_chosen, result.rewards_rejected], bins=30, label=["chosen", "rejected"])
    left.set_title("eval rewards")
    left.legend()
    margins = [c - r for c, r in zip(result.rewards_chosen, result.rewards_rejected)]
    right.hist(margins, bins=30, color="#4f81bd")
    right.axvline(0, color="black", lw=1)
    right.set_title(f"r_chosen - r_rejected (accuracy {result.accuracy:.3f})")
    fig.tight_layout()
    plt.close(fig)
    return fig
