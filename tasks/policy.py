"""Stage 4: preference optimization of the policy (DPO / IPO / SimPO) with the T-REG token-level regularizer.

Losses (tasks/losses.py): DPO (Rafailov et al. 2023, "Direct Preference Optimization"), IPO (Azar et al. 2023),
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
into the saved model; ``num_processes > 1`` runs the same trainer under torchrun with DDP.

Checkpoints (trainable weights as safetensors; optimizer, scheduler, RNG, step, data position and metric history)
are written atomically every ``save_every`` steps, so a killed run resumes and continues the same loss curve.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from creditflow.tasks.abc import project_to_policy
from creditflow.tasks.logprobs import DEFAULT_CHUNK, check_lm_head, lm_head_logits
from creditflow.tasks.losses import PreferenceLossConfig, preference_loss, token_reward_correlation
from creditflow.tasks.schema import Messages, split_rows
from creditflow.tasks.tokenization import encode_pair

if TYPE_CHECKING:  # importing it pulls in MLflow, which torchrun workers never need
    from creditflow.tasks.stage import StageContext

TOKEN_REWARD_SOURCES = ("contrastive", "abc", "none")
SIDES = ("chosen", "rejected")
# cuDNN's SDPA pays 0.1-2 s per new padded shape; rounding widths to 64 keeps the shape count small
# (shared docs/gpu_baselines.md: TRL 33k -> 56k tok/s). CPU kernels have no per-shape cost.
CUDA_PAD_MULTIPLE = 64
MEGABATCH = 50  # micro-batches sorted by length together (as transformers' LengthGroupedSampler)


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021) on ``target_modules``; merged into the weights of the saved model."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r < 1 or not self.target_modules:
            raise ValueError("policy.lora: r must be >= 1 and target_modules non-empty")


@dataclass
class PolicyConfig:
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)  # loss_type, beta, alpha (T-REG), ...
    token_reward_source: str = "contrastive"  # contrastive | abc | none (none needs loss.alpha == 0)
    learning_rate: float = 5e-7
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; caps epochs
    batch_size: int = 8  # pairs per micro-batch and process (2 x batch_size rows per forward)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    seed: int = 0
    gradient_checkpointing: bool = False  # recompute decoder activations in backward
    bf16: bool = True  # CUDA only: bf16 autocast over fp32 master weights; CPU trains in fp32
    length_grouped: bool = True  # batch pairs of similar length together to cut padding
    chunk_size: int = DEFAULT_CHUNK  # completion positions per LM-head chunk
    lora: LoraConfig | None = None
    save_every: int = 50  # optimizer steps between resumable checkpoints
    num_processes: int = 1  # 1: in-process; N > 1: torchrun subprocess with DDP (gloo on CPU, nccl on CUDA)

    def __post_init__(self) -> None:
        if self.token_reward_source not in TOKEN_REWARD_SOURCES:
            raise ValueError(f"policy.token_reward_source must be one of {TOKEN_REWARD_SOURCES}")
        if self.token_reward_source == "none" and self.loss.alpha != 0:
            raise ValueError("policy.token_reward_source 'none' needs loss.alpha == 0 (the regularizer needs r_hat)")
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "num_processes", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy.{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("policy.max_steps must be >= 1 or null")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyConfig":
        """The inverse of ``dataclasses.asdict`` (the torchrun worker receives the config as JSON)."""
        data = dict(data)
        data["loss"] = PreferenceLossConfig(**data["loss"])
        data["lora"] = LoraConfig(**data["lora"]) if data.get("lora") else None
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------
# Examples: ids, reference log-probs and token rewards of both sides of every pair


@dataclass
class SideTokens:
    prompt_ids: list[int]
    completion_ids: list[int]
    ref_logps: list[float]  # log pi_ref of each completion token under the plain prompt
    rewards: list[float] | None  # r_hat per completion token; None when token_reward_source is none


@dataclass
class PolicyExample:
    pair_id: str
    chosen: SideTokens
    rejected: SideTokens

    @property
    def length(self) -> int:
        """Width this pair needs in a padded batch (both rows share it)."""
        return max(len(s.prompt_ids) + len(s.completion_ids) for s in (self.chosen, self.rejected))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PolicyExample":
        return cls(data["pair_id"], SideTokens(**data["chosen"]), SideTokens(**data["rejected"]))


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def build_examples(
    tokenizer,
    pairs: pa.Table,
    token_rewards: pa.Table,
    source: str,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation: str,
) -> list[PolicyExample]:
    """Training examples for ``pairs`` from the token-reward table, checked token by token.

    Ids are re-derived with :func:`encode_pair` under the token-reward stage's tokenization knobs and must equal the
    ``contrastive`` rows' ``token_ids``: those rows carry the reference log-probs, and their r_hat is aligned to
    exactly these tokens. ``abc`` rows live on the reward model's tokens and are projected onto the policy's.
    """
    wanted = set(pairs.column("pair_id").to_pylist())
    columns = ["pair_id", "side", "source", "token_ids", "rewards", "ref_logps"]
    if source == "abc":
        columns += ["char_start", "char_end"]
    rows = {
        (r["pair_id"], r["side"], r["source"]): r
        for r in token_rewards.select(columns).to_pylist()
        if r["pair_id"] in wanted and r["source"] in ("contrastive", source)
    }
    examples = []
    for pair in pairs.select(["pair_id", "prompt", *SIDES]).to_pylist():
        sides = {}
        for side in SIDES:
            prompt_ids, completion_ids = encode_pair(
                tokenizer, pair["prompt"], pair[side], max_length, max_prompt_length, truncation
            )
            sides[side] = _side_tokens(
                rows, pair["pair_id"], side, pair[side], prompt_ids, completion_ids, source, tokenizer
            )
        examples.append(PolicyExample(pair["pair_id"], sides["chosen"], sides["rejected"]))
    return examples


def _side_tokens(
    rows: dict, pair_id: str, side: str, completion: Messages, prompt_ids, completion_ids, source, tokenizer
) -> SideTokens:
    where = f"policy: pair {pair_id} ({side})"
    row = rows.get((pair_id, side, "contrastive"))
    if row is None:
        raise ValueError(
            f"{where}: the token_rewards artifact has no contrastive row for it. Contrastive rows carry the policy's "
            "token ids and reference log-probs: token_rewards.sources must include 'contrastive', and the stage must "
            "have scored these pairs"
        )
    stored = row["token_ids"]
    position = _first_difference(stored, completion_ids)
    if position is not None:

        def at(ids: list[int]) -> str:
            return str(ids[position]) if position < len(ids) else "end of sequence"

        raise ValueError(
            f"{where}: stored token ids differ from encode_pair's at completion position {position} "
            f"(stored {at(stored)}, encode_pair {at(completion_ids)}; {len(stored)} vs {len(completion_ids)} tokens). "
            "The token_rewards artifact was made with another tokenizer, chat template or truncation: recompute it"
        )
    if row["ref_logps"] is None or len(row["ref_logps"]) != len(stored):
        raise ValueError(f"{where}: the contrastive row has no reference log-probs for every token")
    if source == "none":
        rewards = None
    elif source == "contrastive":
        rewards = row["rewards"]
    else:
        abc_row = rows.get((pair_id, side, "abc"))
        if abc_row is None:
            raise ValueError(f"{where}: token_reward_source is 'abc' but the token_rewards artifact has no abc row")
        rewards = project_to_policy(abc_row, tokenizer, completion, len(completion_ids)).tolist()
    if rewards is not None and len(rewards) != len(stored):
        raise ValueError(f"{where}: {len(rewards)} token rewards for {len(stored)} tokens")
    return SideTokens(prompt_ids, completion_ids, row["ref_logps"], rewards)


# ---------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """2B right-padded rows ``[prompt | completion | pad]``: the B chosen sides, then the B rejected ones."""

    input_ids: torch.Tensor  # [2B, S]
    attention_mask: torch.Tensor  # [2B, S]
    rows: torch.Tensor  # [N] row of every completion token
    cols: torch.Tensor  # [N] its column (predicted from column - 1)
    index: torch.Tensor  # [N] its position inside the completion
    mask: torch.Tensor  # [2B, T] completion mask, float
    ref_logps: torch.Tensor  # [2B, T]
    rewards: torch.Tensor | None  # [2B, T]

    @property
    def pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate(examples: list[PolicyExample], pad_id: int, device: torch.device, pad_multiple: int = 1) -> Batch:
    sides = [e.chosen for e in examples] + [e.rejected for e in examples]
    width = max(len(s.prompt_ids) + len(s.completion_ids) for s in sides)
    width = -(-width // pad_multiple) * pad_multiple
    longest = max(len(s.completion_ids) for s in sides)
    input_ids = torch.full((len(sides), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sides), width), dtype=torch.long)
    mask = torch.zeros((len(sides), longest))
    ref = torch.zeros((len(sides), longest))
    rewards = torch.zeros((len(sides), longest)) if sides[0].rewards is not None else None
    rows, cols, index = [], [], []
    for r, side in enumerate(sides):
        p, c = len(side.prompt_ids), len(side.completion_ids)
        input_ids[r, : p + c] = torch.tensor(side.prompt_ids + side.completion_ids)
        attention_mask[r, : p + c] = 1
        mask[r, :c] = 1
        ref[r, :c] = torch.tensor(side.ref_logps)
        if rewards is not None:
            rewards[r, :c] = torch.tensor(side.rewards)
        rows += [r] * c
        cols += range(p, p + c)
        index += range(c)
    to = partial(torch.tensor, dtype=torch.long, device=device)
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        to(rows),
        to(cols),
        to(index),
        mask.to(device),
        ref.to(device),
        rewards.to(device) if rewards is not None else None,
    )


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, length_grouped: bool, world: int = 1
) -> list[list[int]]:
    """Micro-batches (example indices) of one epoch, a function of (seed, epoch) only, so a resumed run replays it.

    Length grouping sorts each window of ``MEGABATCH`` micro-batches by length, then shuffles the micro-batches, so
    padding drops without feeding lengths in order. Under DDP the list is cut to a multiple of the process count
    (at most ``world - 1`` micro-batches dropped per epoch), so every process runs the same number of backwards.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if length_grouped:
        window = batch_size * MEGABATCH
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: -lengths[i])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if length_grouped:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches[: len(batches) - len(batches) % world]


# ---------------------------------------------------------------------------------------------------------
# Log-probs with gradients, without [rows, seq, vocab] tensors


def _chunk_logprobs(lm, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head_logits(lm, states).float()
    return logits.gather(-1, labels[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def training_logprobs(
    lm,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """log pi(input_ids[r, c] | input_ids[r, :c]) for every (r, c) in (rows, cols), fp32, differentiable.

    The training-time twin of ``logprobs.completion_logprobs``: the decoder runs once, only the hidden states that
    predict completion tokens are kept, and the LM head, gather and logsumexp run per chunk under activation
    checkpointing. Autograd therefore stores [chunk, hidden] states and recomputes each [chunk, vocab] fp32 logits
    block in backward instead of keeping it: peak extra memory is one block in either pass.
    """
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    states, labels = hidden[rows, cols - 1], input_ids[rows, cols]
    # The LM head draws no random numbers, so the checkpoint need not stash RNG state.
    chunk = partial(checkpoint, partial(_chunk_logprobs, lm), use_reentrant=False, preserve_rng_state=False)
    return torch.cat(
        [chunk(states[s : s + chunk_size], labels[s : s + chunk_size]) for s in range(0, len(labels), chunk_size)]
    )


class CompletionLogprobs(torch.nn.Module):
    """The policy as one module whose forward returns completion log-probs: what DDP wraps, so its hooks see it."""

    def __init__(self, lm, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, rows, cols) -> torch.Tensor:
        return training_logprobs(self.lm, input_ids, attention_mask, rows, cols, self.chunk_size)


# ---------------------------------------------------------------------------------------------------------
# Trainer

StepCallback = Callable[[int, dict[str, float]], None]
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


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup to the peak learning rate, then cosine decay to 0: transformers'
    ``get_cosine_schedule_with_warmup``, written out because importing that module imports peft (seconds per
    torchrun worker)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)


def load_policy_model(model_dir: str | Path, config: PolicyConfig, device: torch.device):
    """(trained model, causal LM inside it): the same object, or a PEFT wrapper and the LM it patched."""
    # bf16 on CUDA: autocast over fp32 master weights. Pure bf16 weights would be ~13% faster and ~6 GiB lighter at
    # 0.5B params (gpu_baselines.md), but DPO learning rates (1e-7..1e-6) are far below bf16's relative precision
    # (2^-8), so most updates would round away. Frozen LoRA bases hold no updates and load in bf16.
    cuda_bf16 = config.bf16 and device.type == "cuda"
    dtype = torch.bfloat16 if cuda_bf16 and config.lora else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device)
    check_lm_head(lm)
    lm.config.use_cache = False
    if config.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is None:
        return lm.train(), lm
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    adapters = PeftLoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(lm, adapters)  # adapters are fp32 even on a bf16 base (autocast_adapter_dtype)
    return model.train(), model.get_base_model()


class PolicyTrainer:
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
    ):
        if not examples:
            raise ValueError("policy: no training pairs")
        if config.loss.alpha > 0 and examples[0].chosen.rewards is None:
            raise ValueError("policy: loss.alpha > 0 needs token rewards (token_reward_source is none)")
        self.config, self.examples, self.model_dir = config, examples, Path(model_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.on_step, self.progress = on_step, progress
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device("cpu")
        self.autocast = self.device.type == "cuda" and config.bf16
        self.pad_multiple = CUDA_PAD_MULTIPLE if self.device.type == "cuda" else 1

        torch.manual_seed(config.seed)  # LoRA initialization; DDP then broadcasts rank 0's weights
        self.model, self.lm = load_policy_model(model_dir, config, self.device)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        decay = [p for p in self.trainable.values() if p.ndim >= 2]  # no decay on norms and biases (as HF Trainer)
        rest = [p for p in self.trainable.values() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=config.learning_rate,
            fused=self.device.type == "cuda",
        )
        self.lengths = [e.length for e in examples]
        self.micro_per_epoch = len(epoch_batches(self.lengths, config.batch_size, 0, 0, False, self.world))
        if self.micro_per_epoch == 0:
            raise ValueError(f"policy: {len(examples)} pairs make no micro-batch for each of {self.world} processes")
        self.per_step = config.grad_accum * self.world
        total = math.ceil(self.micro_per_epoch / self.per_step) * config.epochs
        self.total_steps = min(total, config.max_steps) if config.max_steps is not None else total
        self.scheduler = cosine_schedule(
            self.optimizer, math.ceil(config.warmup_ratio * self.total_steps), self.total_steps
        )
        self.step, self.position, self.history = 0, (0, 0), []
        self.resumed_from = self._load_checkpoint() if self._checkpoint() is not None else 0
        if not self.resumed_from:
            torch.manual_seed(config.seed + self.rank)  # distinct dropout masks per process
        module = CompletionLogprobs(self.lm, config.chunk_size)
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        self.module = module

    # -- training ------------------------------------------------------------------------------------------

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
        for epoch in range(start_epoch, config.epochs):
            batches = epoch_batches(
                self.lengths, config.batch_size, config.seed, epoch, config.length_grouped, self.world
            )
            for first in range(start_batch if epoch == start_epoch else 0, len(batches), self.per_step):
                if self.step >= self.total_steps:
                    break
                metrics = self._train_step(batches[first : first + self.per_step])
                self.step += 1
                self.position = (epoch, first + self.per_step)
                metrics["epoch"] = epoch + min(first + self.per_step, len(batches)) / len(batches)
                self.history.append({"step": self.step, **metrics})
                bar.update(1)
                if (
                    self.checkpoint_dir is not None
                    and self.step % config.save_every == 0
                    and self.step < self.total_steps
                ):
                    self._save_checkpoint()
                if self.on_step is not None and self.rank == 0:
                    self.on_step(self.step, metrics)
        bar.close()
        return self.history

    def _train_step(self, group: list[list[int]]) -> dict[str, float]:
        started = time.perf_counter()
        n_pairs = sum(len(rows) for rows in group)
        mine = group[self.rank :: self.world]
        sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64)  # pair-weighted metrics, then tokens
        logps, refs, targets = [], [], []
        lr = self.scheduler.get_last_lr()[0]
        for i, rows in enumerate(mine):
            batch = collate([self.examples[j] for j in rows], self.pad_id, self.device, self.pad_multiple)
            last = i == len(mine) - 1
            with nullcontext() if last or self.world == 1 else self.module.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    flat = self.module(batch.input_ids, batch.attention_mask, batch.rows, batch.cols)
                logp = flat.new_zeros(batch.mask.shape).index_put((batch.rows, batch.index), flat)
                out = self._loss(batch, logp)
                # Scaled so that the gradient (averaged over processes by DDP) is the mean over the step's pairs.
                (out.loss * len(rows) * self.world / n_pairs).backward()
            values = out.metrics()
            sums[:-1] += torch.tensor([values[k] for k in METRIC_NAMES], dtype=torch.float64) * len(rows)
            sums[-1] += batch.attention_mask.sum().item()
            if batch.rewards is not None:
                keep = batch.mask.bool()
                logps.append(logp.detach()[keep].cpu())
                refs.append(batch.ref_logps[keep].cpu())
                targets.append(batch.rewards[keep].cpu())
        norm = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), norm).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        peak = torch.tensor([_peak_memory_gb(self.device)], dtype=torch.float64)
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

    # -- outputs -------------------------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path) -> None:
        """The trained model (LoRA merged) and its tokenizer as safetensors; written by rank 0."""
        if self.rank == 0:
            model = self.model.merge_and_unload() if self.config.lora is not None else self.model
            model.save_pretrained(str(out_dir), safe_serialization=True)
            AutoTokenizer.from_pretrained(str(self.model_dir)).save_pretrained(str(out_dir))
        if self.world > 1:
            dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------------------

    def _checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder: the folder, or ``.old`` if a swap was interrupted."""
        if self.checkpoint_dir is None:
            return None
        for folder in (self.checkpoint_dir, self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".old")):
            if (folder / "state.pt").is_file():
                return folder
        return None

    def _save_checkpoint(self) -> None:
        folder = self.checkpoint_dir
        tmp = folder.with_name(f"{folder.name}.tmp-{self.step}")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        rng = {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        torch.save(rng, tmp / f"rng-{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            save_file(
                {n: p.detach().contiguous().cpu() for n, p in self.trainable.items()}, tmp / "trainable.safetensors"
            )
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "position": list(self.position),
                "history": self.history,
                "world": self.world,
                "config": asdict(self.config),
            }
            torch.save(state, tmp / "state.pt")  # written last: its presence marks a complete checkpoint
            # At every instant the folder or .old holds a complete checkpoint (_checkpoint reads either).
            old = folder.with_name(folder.name + ".old")
            if folder.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _load_checkpoint(self) -> int:
        folder = self._checkpoint()
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        if state["config"] != asdict(self.config) or state["world"] != self.world:
            raise ValueError(
                f"{folder}: checkpoint of another run (config or process count differs); delete it to start over"
            )
        weights = load_file(folder / "trainable.safetensors")
        if set(weights) != set(self.trainable):
            raise ValueError(f"{folder}: checkpoint parameters do not match the model's trainable parameters")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position, self.history = state["step"], tuple(state["position"]), state["history"]
        rng = torch.load(folder / f"rng-{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return self.step

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# Several processes: torchrun in a subprocess, metrics streamed back


def launch_distributed(
    model_dir: str | Path,
    examples: list[PolicyExample],
    config: PolicyConfig,
    output_dir: str | Path,
    *,
    checkpoint_dir: str | Path | None = None,
    on_step: StepCallback | None = None,
    poll_seconds: float = 0.5,
) -> list[dict[str, float]]:
    """Train with ``torchrun --nproc_per_node config.num_processes`` (tasks/policy_worker.py) and wait for it.

    Running in a subprocess frees every GPU byte when the stage ends. Rank 0 appends each step's metrics to a JSONL
    file that this process tails and hands to ``on_step`` as they arrive; returns the whole history.
    """
    work = Path(tempfile.mkdtemp(prefix="creditflow-policy-"))
    process = None
    try:
        torch.save([asdict(e) for e in examples], work / "examples.pt")
        spec = {
            "model_dir": str(model_dir),
            "config": asdict(config),
            "examples": str(work / "examples.pt"),
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
            "output_dir": str(output_dir),
            "metrics": str(work / "metrics.jsonl"),
            "history": str(work / "history.json"),
        }
        (work / "spec.json").write_text(json.dumps(spec))
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={config.num_processes}",
            "-m",
            "creditflow.tasks.policy_worker",
            str(work / "spec.json"),
        ]
        with open(work / "output.log", "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            offset = 0
            while True:
                done = process.poll() is not None
                offset = _forward_metrics(work / "metrics.jsonl", offset, on_step)
                if done:
                    break
                time.sleep(poll_seconds)
        if process.returncode != 0:
            tail = (work / "output.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(
                f"policy: torchrun exited with status {process.returncode}; its output ends with:\n{tail}"
            )
        return json.loads((work / "history.json").read_text())
    finally:
        if process is not None and process.poll() is None:  # interrupted while waiting: stop our torchrun
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


def _forward_metrics(path: Path, offset: int, on_step: StepCallback | None) -> int:
    """Hand every complete new line of the metrics file to ``on_step``; returns the new read offset."""
    if not path.is_file():
        return offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    for line in complete.splitlines():
        entry = json.loads(line)
        if on_step is not None:
            on_step(entry.pop("step"), entry)
    return offset + len(complete)


# ---------------------------------------------------------------------------------------------------------
# Stage entry point


def compute_policy(ctx: StageContext) -> dict[str, float]:
    """Train the token-reward stage's reference model on the train pairs; write ``model/`` and ``train_log``."""
    from creditflow.tasks.models import resolve_model
    from creditflow.tasks.tokenization import load_tokenizer

    config: PolicyConfig = ctx.config
    knobs = ctx.upstream["token_rewards"].config
    try:
        model_dir = resolve_model(knobs["model"])
        tokenization = {k: knobs[k] for k in ("max_length", "max_prompt_length", "truncation")}
    except KeyError as exc:
        raise ValueError(f"policy: the token_rewards manifest config has no {exc} (an older artifact?)") from None
    pairs = ctx.read_upstream("onpolicy" if "onpolicy" in ctx.upstream else "curate", "pairs")
    train = split_rows(pairs, "train")
    if not train.num_rows:
        raise ValueError("policy: the pairs have no train split")
    table = ctx.read_upstream("token_rewards", "token_rewards")
    examples = build_examples(load_tokenizer(str(model_dir)), train, table, config.token_reward_source, **tokenization)

    logged: set[int] = set()

    def log_step(step: int, metrics: dict[str, float]) -> None:
        ctx.run.log_metrics(metrics, step=step)
        logged.add(step)

    model_out = ctx.writer.dir / "model"
    if config.num_processes == 1:
        trainer = PolicyTrainer(
            model_dir, examples, config, checkpoint_dir=ctx.checkpoint_dir, on_step=log_step, progress=ctx.progress
        )
        history = trainer.train()
        trainer.save_pretrained(model_out)
        del trainer
    else:
        history = launch_distributed(
            model_dir, examples, config, model_out, checkpoint_dir=ctx.checkpoint_dir, on_step=log_step
        )
    for entry in history:  # steps restored from a checkpoint were logged by the run that made them
        if entry["step"] not in logged:
            ctx.run.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])

    ctx.writer.write_table("train_log", history_table(history))
    ctx.run.log_figure(loss_figure(history), "policy/loss_curve.png")
    ctx.run.log_artifacts([model_out], "policy")
    shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)  # the published artifact supersedes it
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
    return metrics


def history_table(history: list[dict[str, float]]) -> pa.Table:
    names = list(dict.fromkeys(k for entry in history for k in entry if k != "step"))
    columns = {"step": pa.array([h["step"] for h in history], pa.int32())}
    columns.update({k: pa.array([h.get(k) for h in history], pa.float64()) for k in names})
    return pa.table(columns)


def loss_figure(history: list[dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("loss", "sequence_loss", "regularizer"):
        left.plot(steps, [h[name] for h in history], label=name)
    left.set_xlabel("step")
    left.set_title("training loss")
    left.legend()
    right.plot(steps, [h["rewards_accuracy"] for h in history], label="reward accuracy")
    right.plot(steps, [h["rewards_margin"] for h in history], label="reward margin")
    right.set_xlabel("step")
    right.set_title("implicit rewards")
    right.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
