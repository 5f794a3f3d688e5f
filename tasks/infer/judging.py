"""Pairwise verdicts of a policy against the reference: win rates, their length-controlled form, and an LLM judge.

Length control (Dubois, Galambosi, Liang, Hashimoto 2024, "Length-Controlled AlpacaEval"): DPO-family methods
learn to win by writing longer, so the raw win rate mixes quality with length. A logistic GLM explains each prompt's
outcome o_i (1 win, 0.5 tie, 0 loss) by the policy's quality θ and a length term,

    P(win_i) = σ(θ + φ · tanh((ℓ_policy,i − ℓ_reference,i) / std(ℓ_policy − ℓ_reference))),

and the length-controlled win rate is the GLM's prediction with the length term removed, σ(θ). AlpacaEval 2 also
fits an instruction-difficulty term across the many models of its leaderboard; with one pair of systems there is
nothing to fit it on, so it is left out. Fitted by Newton's method on the cross-entropy with a small ridge penalty
(so a policy that wins or loses everywhere gets a finite θ).

The judge (:class:`PairwiseJudge`) is any local chat model asked which of two answers is better. It reads the
probabilities of the answer letters instead of sampling, and judges each pair in both orders: the policy wins a
prompt only when it is preferred in both, loses only when the reference is, and a split verdict (a judge that
follows the position, not the content) is a tie.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from creditflow.tasks.models.tokenization import encode_prompts, padded_batch

LC_RIDGE = 1e-2  # the ridge penalty on (θ, φ): finite estimates when one system wins every prompt


def outcomes(policy: list[float], reference: list[float]) -> list[float]:
    """Per prompt: 1 when the policy's score is higher, 0.5 on a tie, 0 when lower."""
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)]


def win_rate(policy: list[float], reference: list[float]) -> float:
    """Share of prompts where the policy's score beats the reference's; a tie counts half."""
    return float(np.mean(outcomes(policy, reference))) if policy else float("nan")


def length_controlled_win_rate(
    results: list[float], policy_lengths: list[int], reference_lengths: list[int], ridge: float = LC_RIDGE
) -> float:
    """σ(θ) of the length GLM above, for per-prompt ``results`` (1, 0.5, 0) and the two systems' answer lengths."""
    if not results:
        return float("nan")
    y = np.asarray(results, dtype=np.float64)
    delta = np.asarray(policy_lengths, dtype=np.float64) - np.asarray(reference_lengths, dtype=np.float64)
    spread = delta.std()
    x = np.tanh(delta / spread) if spread > 0 else np.zeros_like(delta)
    features = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-features @ w))
        gradient = features.T @ (p - y) + ridge * w
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-w[0])))


JUDGE_PROMPT = """Which response answers the instruction better? Reply with the letter A or B only.

Instruction:
{instruction}

Response A:
{a}

Response B:
{b}"""


class PairwiseJudge:
    """A local chat model comparing two answers by the next-token probabilities of "A" and "B"."""

    def __init__(self, model, tokenizer, template: str = JUDGE_PROMPT, batch_size: int = 8):
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size
        self.letters = [self._letter_id(letter) for letter in "AB"]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"judge: the tokenizer spells {letter!r} as {len(ids)} tokens; it needs one")
        return ids[0]

    @torch.no_grad()
    def prefers_first(self, instructions: list[str], firsts: list[str], seconds: list[str]) -> list[float]:
        """P(the judge answers A) / (P(A) + P(B)) for each (instruction, A, B)."""
        device = next(self.model.parameters()).device
        messages = [
            [{"role": "user", "content": self.template.format(instruction=i, a=a, b=b)}]
            for i, a, b in zip(instructions, firsts, seconds)
        ]
        encoded = encode_prompts(self.tokenizer, messages)
        out: list[float] = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(encoded), self.batch_size):
            rows = encoded[start : start + self.batch_size]
            input_ids, attention_mask = padded_batch(rows, pad)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].float()
            pair = torch.log_softmax(last[:, self.letters], dim=-1)
            out += pair[:, 0].exp().tolist()
        return out

    def compare(self, instructions: list[str], policy: list[str], reference: list[str]) -> list[float]:
        """Per prompt 1 (the policy preferred in both orders), 0 (the reference in both) or 0.5 (split)."""
        as_first = self.prefers_first(instructions, policy, reference)  # P(policy) with the policy shown first
        as_second = [1.0 - p for p in self.prefers_first(instructions, reference, policy)]  # shown second
        return [
            1.0 if a > 0.5 and b > 0.5 else 0.0 if a < 0.5 and b < 0.5 else 0.5 for a, b in zip(as_first, as_second)
        ]
