"""Per-token log-probabilities of label tokens under a causal LM, without a full-vocabulary fp32 tensor.

    log pi(y_t | x, y_<t) = z_t[y_t] - logsumexp_v z_t[v],    z_t = W h_{t-1}   (LM head on the previous hidden state)

The naive way, ``log_softmax(logits.float()).gather(labels)``, materializes [B, S, V] logits and an fp32 copy of
them: 47 GiB at B=32, S=1024 for a 150K vocabulary (see the GPU baselines). Here the backbone returns hidden
states, only the positions that predict completion tokens are kept (in T-REG's revision prompts more than half of
every row is prompt), and the LM head, the gather and the logsumexp run one chunk of positions at a time in fp32.
Peak extra memory is one [chunk, V] block. :func:`naive_completion_logprobs` is the reference for tests and the
benchmark.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024  # positions per LM-head chunk: [1024, 49152] fp32 is 200 MB


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``log_softmax(logits)[i, labels[i]]`` for [N, V] logits of any float dtype, in fp32, chunk by chunk."""
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, labels.shape[0], chunk_size):
        block = logits[start : start + chunk_size].float()
        picked = block.gather(-1, labels[start : start + chunk_size, None])[:, 0]
        out[start : start + chunk_size] = picked - torch.logsumexp(block, dim=-1)
    return out


def completion_positions(
    prompt_lengths: list[int], completion_lengths: list[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every completion token, row by row; the token at column c is predicted at column c - 1."""
    rows = torch.repeat_interleave(torch.arange(len(prompt_lengths)), torch.tensor(completion_lengths))
    cols = torch.cat([torch.arange(p, p + c) for p, c in zip(prompt_lengths, completion_lengths)])
    return rows.to(device), cols.to(device)


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The logits ``model`` would produce from final hidden states (Gemma-2 soft-caps them; others are linear)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: list[int],
    completion_lengths: list[int],
    chunk_size: int = DEFAULT_CHUNK,
) -> list[torch.Tensor]:
    """Per-token log-probs (fp32) of each row's completion, rows right-padded as ``[prompt | completion | pad]``."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, cols = completion_positions(prompt_lengths, completion_lengths, input_ids.device)
    states, labels = hidden[rows, cols - 1], input_ids[rows, cols]
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=input_ids.device)
    for start in range(0, labels.shape[0], chunk_size):
        logits = lm_head_logits(model, states[start : start + chunk_size])
        out[start : start + chunk_size] = label_logprobs(logits, labels[start : start + chunk_size], chunk_size)
    return list(out.split(completion_lengths))


@torch.no_grad()
def naive_completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: list[int],
    completion_lengths: list[int],
) -> list[torch.Tensor]:
    """Reference: full [B, S, V] logits and their fp32 ``log_softmax``, then gather. Same output as above."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = torch.log_softmax(logits.float(), dim=-1)
    rows, cols = completion_positions(prompt_lengths, completion_lengths, input_ids.device)
    picked = logps[rows, cols - 1].gather(-1, input_ids[rows, cols][:, None])[:, 0]
    return list(picked.split(completion_lengths))


@torch.no_grad()
def check_lm_head(model) -> None:
    """Fail fast if ``model`` post-processes logits in a way :func:`lm_head_logits` does not reproduce.

    The same final hidden states go through both, so the normal case agrees exactly (no tolerance for rounding).
    """
    device = next(model.parameters()).device
    ids = (torch.arange(1, 9, device=device) % model.config.vocab_size)[None]
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    if not torch.allclose(lm_head_logits(model, out.hidden_states[-1]), out.logits, rtol=1e-3, atol=1e-3):
        raise NotImplementedError(
            f"{type(model).__name__}: its logits are not the LM head of its last hidden state; "
            "fused log-probs would be wrong for this architecture"
        )


# ---------------------------------------------------------------------------------------------------------
# With gradients, for training


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
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """log pi(input_ids[r, c] | input_ids[r, :c]) for every (r, c) in (rows, cols), fp32, differentiable. Packed
    rows (tasks/models/packing.py) come with ``position_ids`` and no attention mask.

    The training-time twin of ``logprobs.completion_logprobs``: the decoder runs once, only the hidden states that
    predict completion tokens are kept, and the LM head, gather and logsumexp run per chunk under activation
    checkpointing. Autograd therefore stores [chunk, hidden] states and recomputes each [chunk, vocab] fp32 logits
    block in backward instead of keeping it: peak extra memory is one block in either pass.
    """
    hidden = lm.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return states_logprobs(lm, hidden[rows, cols - 1], input_ids[rows, cols], chunk_size)


def states_logprobs(lm, states: torch.Tensor, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log-probs of ``labels`` from the [N, hidden] states that predict them, per checkpointed LM-head chunk."""
    # The LM head draws no random numbers, so the checkpoint need not stash RNG state.
    chunk = partial(checkpoint, partial(_chunk_logprobs, lm), use_reentrant=False, preserve_rng_state=False)
    return torch.cat(
        [chunk(states[s : s + chunk_size], labels[s : s + chunk_size]) for s in range(0, len(labels), chunk_size)]
    )


@torch.no_grad()
def states_entropy(lm, states: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy (nats, fp32) of the next-token distribution at each of the [N, hidden] states, chunk by chunk."""
    out = []
    for start in range(0, states.shape[0], chunk_size):
        logp = torch.log_softmax(lm_head_logits(lm, states[start : start + chunk_size]).float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else states.new_zeros(0, dtype=torch.float32)


class CompletionLogprobs(torch.nn.Module):
    """The policy as one module whose forward returns completion log-probs: what DDP wraps, so its hooks see it."""

    def __init__(self, lm, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, rows, cols, position_ids=None) -> torch.Tensor:
        return training_logprobs(self.lm, input_ids, attention_mask, rows, cols, self.chunk_size, position_ids)
