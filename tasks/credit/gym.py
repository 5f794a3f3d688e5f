"""The credit gym: synthetic tasks where the truth of every response token is known, so a token-reward source can be
scored against that truth and its effect on training measured (bench/credit_gym.py runs the experiment).

Two tasks of different structure, over the letters a..z (mod 26), each answer ``ANSWER_TERMS`` space-separated
letters:

    walk   "walk c: 1 3 2 2 1"   -> "d g i k l"   each term is the previous one plus the next step (1..3): a slip
                                                 shifts every later term of the answer (errors propagate)
    shift  "shift 3: a q z m b"  -> "d t c p e"   each term is its own input letter plus 3: errors stay local

The truth of a term is the decision it made. Walk's term i is right iff it equals the response's own term i - 1
plus step i, so after a slip, continuing the rule is right although the answer is wrong from there on;
shift's term i is right iff it is input letter i plus the shift. A response with too few terms has its EOS token
charged with the missing ones; every extra term is wrong.

The SFT data teaches three prompts: the plain one (right answers and corrupted ones, mixed, so the model makes
mistakes), ``"correct: " + prompt`` (right answers only) and ``"with mistakes: " + prompt`` (corrupted only), so
contrastive prompting with that pair of control instructions means something to the model.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from creditflow.tasks.config_base import SamplingConfig
from creditflow.tasks.configs import TEMPLATE_PRESETS
from creditflow.tasks.credit.attention_credit import (
    attention_shares,
    bounded_rewards,
    encode_for_abc,
    project_rewards,
    score_abc,
)
from creditflow.tasks.credit.contrastive import ContrastiveItem, contrastive_messages, score_contrastive
from creditflow.tasks.credit.rl_rewards import Rollout, assistant, token_spans
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.infer.generation import sample_token_ids, stop_token_ids
from creditflow.tasks.models.loading import load_abc_model, load_reference_model, load_tokenizer
from creditflow.tasks.models.logprobs import completion_logprobs, completion_positions, training_logprobs
from creditflow.tasks.models.tokenization import encode_completions, encode_prompts, pad_token_id, padded_batch
from creditflow.tasks.train.optim import adamw
from creditflow.tasks.train.preference_batches import PolicyExample, SideTokens

LETTERS = string.ascii_lowercase
ANSWER_TERMS = 5
MAX_STEP = 3  # walk steps 1..3: with steps up to 25 a 2-layer model does not learn the rule in minutes
CONTROLS = {"better": "correct: {instruction}", "worse": "with mistakes: {instruction}"}
_TERM = re.compile(r"\S+")


def _letter(index: int) -> str:
    return LETTERS[index % 26]


def _index(term: str) -> int | None:
    return LETTERS.index(term) if len(term) == 1 and term in LETTERS else None


class Walk:
    """'walk c: 1 3 2 2 1' -> a walk from c by each step in turn (mod 26): 'd g i k l'. Each term is the response's
    own previous term plus the next step, so a slip shifts every later term of the answer."""

    name = "walk"
    _prompt = re.compile(r"^walk ([a-z]): ([1-9](?: [1-9])*)$")

    def sample(self, rng: np.random.Generator) -> str:
        steps = " ".join(str(int(s)) for s in rng.integers(1, MAX_STEP + 1, size=ANSWER_TERMS))
        return f"walk {_letter(int(rng.integers(26)))}: {steps}"

    def _parse(self, prompt: str) -> tuple[int, list[int]]:
        match = self._prompt.match(prompt)
        if match is None:
            raise ValueError(f"not a walk prompt: {prompt!r}")
        return LETTERS.index(match.group(1)), [int(s) for s in match.group(2).split()]

    def expected(self, prompt: str, terms: list[str]) -> list[str]:
        """The right term at each of ANSWER_TERMS positions, given the response's own earlier terms."""
        previous, steps = self._parse(prompt)
        out = []
        for i, step in enumerate(steps):
            out.append(_letter(previous + step))
            own = _index(terms[i]) if i < len(terms) else None
            previous = own if own is not None else previous + step  # continue from the response's own term
        return out

    def corrupt(self, prompt: str, rng: np.random.Generator, rate: float) -> list[str]:
        """An answer that slips (adds a random offset to one step) at each position with probability ``rate``,
        at least once, and follows the rule from its own terms otherwise."""
        previous, steps = self._parse(prompt)
        slips = rng.random(ANSWER_TERMS) < rate
        slips[int(rng.integers(ANSWER_TERMS))] = True
        terms = []
        for step, slip in zip(steps, slips):
            previous += step + (int(rng.integers(1, 26)) if slip else 0)
            terms.append(_letter(previous))
        return terms


class Shift:
    """'shift k: x1 .. x5' -> each letter shifted by k (mod 26)."""

    name = "shift"
    _prompt = re.compile(r"^shift (\d+): ([a-z](?: [a-z])*)$")

    def sample(self, rng: np.random.Generator) -> str:
        shift = int(rng.integers(1, 6))
        letters = " ".join(_letter(int(i)) for i in rng.integers(26, size=ANSWER_TERMS))
        return f"shift {shift}: {letters}"

    def _parse(self, prompt: str) -> tuple[int, list[int]]:
        match = self._prompt.match(prompt)
        if match is None:
            raise ValueError(f"not a shift prompt: {prompt!r}")
        return int(match.group(1)), [LETTERS.index(c) for c in match.group(2).split()]

    def expected(self, prompt: str, terms: list[str]) -> list[str]:
        shift, letters = self._parse(prompt)
        return [_letter(x + shift) for x in letters]

    def corrupt(self, prompt: str, rng: np.random.Generator, rate: float) -> list[str]:
        """The right answer with each term replaced by another letter with probability ``rate`` (at least one)."""
        terms = self.expected(prompt, [])
        wrong = rng.random(ANSWER_TERMS) < rate
        wrong[int(rng.integers(ANSWER_TERMS))] = True
        return [_letter(LETTERS.index(t) + int(rng.integers(1, 26))) if w else t for t, w in zip(terms, wrong)]


TASKS = {task.name: task for task in (Walk(), Shift())}


def task_of(prompt: str):
    """The task whose prompt format ``prompt`` (a user turn, control prefix removed) has."""
    return TASKS["walk" if prompt.startswith("walk ") else "shift"]


def answer(prompt: str) -> str:
    """The right answer's text."""
    return " ".join(task_of(prompt).expected(prompt, []))


def messages(prompt: str, control: str | None = None) -> Messages:
    """The chat turn for ``prompt``, under a control instruction ('better' or 'worse') or plain."""
    content = CONTROLS[control].format(instruction=prompt) if control else prompt
    return [{"role": "user", "content": content}]


@dataclass
class Judgement:
    """The truth of one response: its terms' spans and rightness, and its error count."""

    spans: list[tuple[int, int]]
    right: list[bool]
    missing: int  # terms short of ANSWER_TERMS

    @property
    def errors(self) -> int:
        return self.right.count(False) + self.missing


def judge(prompt: str, text: str) -> Judgement:
    """Each term of ``text`` (a response to the plain ``prompt``) right or wrong, as the module docstring says."""
    found = list(_TERM.finditer(text))
    terms = [m.group() for m in found]
    expected = task_of(prompt).expected(prompt, terms)
    right = [i < ANSWER_TERMS and term == expected[i] for i, term in enumerate(terms)]
    return Judgement([m.span() for m in found], right, max(ANSWER_TERMS - len(terms), 0))


def tokens_over(char_start: list[int], char_end: list[int], span: tuple[int, int]) -> list[int]:
    """The indices of the tokens whose character spans overlap ``span`` (one term of a response)."""
    start, end = span
    return [t for t, (s, e) in enumerate(zip(char_start, char_end)) if s < end and e > start]


def token_truth(judgement: Judgement, char_start: list[int], char_end: list[int], stopped: bool) -> np.ndarray:
    """+1 (right), -1 (wrong) or 0 (carries no decision: spaces) for each token of a response, from the character
    spans of its tokens; the last token, when it is the stop token, is wrong iff terms are missing."""
    truth = np.zeros(len(char_start), dtype=np.float32)
    for (start, end), right in zip(judgement.spans, judgement.right):
        truth[tokens_over(char_start, char_end, (start, end))] = 1.0 if right else -1.0
    if stopped and len(truth):
        truth[-1] = -1.0 if judgement.missing else 1.0
    return truth


def exact_match_reward(prompts: list[Messages], completions: list[str]) -> list[float]:
    """A verifiable reward for ``rl.reward_functions``: 1 for a right answer, else 0 (prompts are plain turns)."""
    return [float(judge(p[-1]["content"], text).errors == 0) for p, text in zip(prompts, completions)]


def oracle_credit(rollouts: list[Rollout]) -> list[np.ndarray]:
    """An ``rl.credit_function``: the truth of every rollout token (``token_truth``), at the offline oracle's
    scale; the last token is the stop token unless the rollout was truncated."""
    return [
        ORACLE_SCALE * token_truth(judge(r.prompt[-1]["content"], r.text), r.char_start, r.char_end, not r.truncated)
        for r in rollouts
    ]


def inverted_credit(rollouts: list[Rollout]) -> list[np.ndarray]:
    """An ``rl.credit_function``: the oracle with its sign flipped (a wrong credit)."""
    return [-credit for credit in oracle_credit(rollouts)]


def random_sign_credit(rollouts: list[Rollout]) -> list[np.ndarray]:
    """An ``rl.credit_function``: the oracle's positions with signs that carry no information, drawn from the
    rollout's own ids so the same rollout always gets the same signs."""
    return [
        np.abs(credit) * np.random.default_rng(r.completion_ids).choice([-1.0, 1.0], len(credit)).astype(np.float32)
        for r, credit in zip(rollouts, oracle_credit(rollouts))
    ]


def paired_slot_score(right: list[float], wrong: list[float]) -> float:
    """The audit's paired, within-slot score: the share of items where a source ranks the right token above the
    wrong one at the same place after the same prefix (ties count half). 1 for a perfect source, 0 for an inverted
    one, 0.5 for one that cannot tell."""
    right_arr, wrong_arr = np.asarray(right, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    if not len(right_arr) or right_arr.shape != wrong_arr.shape:
        raise ValueError("paired_slot_score needs one right and one wrong score per item")
    return float(np.mean((right_arr > wrong_arr) + 0.5 * (right_arr == wrong_arr)))


def slot_mean(rewards: np.ndarray, char_start: list[int], char_end: list[int], span: tuple[int, int]) -> float:
    """The mean token reward over the tokens that overlap the character ``span`` (one term)."""
    overlap = tokens_over(char_start, char_end, span)
    if not overlap:
        raise ValueError(f"no token overlaps characters {span[0]}..{span[1]}")
    return float(np.mean(np.asarray(rewards)[overlap]))


def seeded(seed: int, *salt: int) -> np.random.Generator:
    """A generator for one (seed, purpose): the gym's every random choice is reproducible and independent."""
    return np.random.default_rng([seed, *salt])


def corrupted_dataset(
    task, n: int, rng: np.random.Generator, plain_right_share: float = 0.6, rate: float = 0.3
) -> list[tuple[Messages, str]]:
    """SFT examples ((turn, answer text)) for ``n`` problems: each problem once under every prompt kind."""
    examples = []
    for _ in range(n):
        prompt = task.sample(rng)
        right = " ".join(task.expected(prompt, []))
        plain = right if rng.random() < plain_right_share else " ".join(task.corrupt(prompt, rng, rate))
        examples.append((messages(prompt), plain))
        examples.append((messages(prompt, "better"), right))
        examples.append((messages(prompt, "worse"), " ".join(task.corrupt(prompt, rng, rate + 0.1))))
    return examples


# ---------------------------------------------------------------------------------------------------------
# The SFT model: a tiny causal LM trained from scratch on the three prompt kinds


def train_sft(
    model_dir: Path, examples: list[tuple[Messages, str]], steps: int, seed: int, lr: float = 3e-3, batch_size: int = 32
) -> list[float]:
    """Train the causal LM in ``model_dir`` (in place) on ``examples`` with the NLL of the answer tokens; returns
    the loss of every step. The batch order is ``seed``'s."""
    model = load_reference_model(model_dir, torch.device("cpu"), torch.float32).requires_grad_(True).train()
    tokenizer = load_tokenizer(str(model_dir))
    prompts = encode_prompts(tokenizer, [turn for turn, _ in examples])
    answers = encode_completions(tokenizer, [assistant(text) for _, text in examples])
    optimizer = adamw(dict(model.named_parameters()), lr, 0.0, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    rng, losses = seeded(seed, 1), []
    for _ in range(steps):
        rows = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        ids, mask = padded_batch([prompts[i] + answers[i] for i in rows], pad_token_id(tokenizer))
        positions = completion_positions([len(prompts[i]) for i in rows], [len(answers[i]) for i in rows], ids.device)
        loss = -training_logprobs(model, ids, mask, *positions).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval().save_pretrained(model_dir)
    return losses


# ---------------------------------------------------------------------------------------------------------
# Responses with their truth, and preference pairs


@dataclass
class Response:
    prompt: str  # the plain user turn
    prompt_ids: list[int]
    ids: list[int]  # completion token ids, as sampled (or as the policy tokenizes a given text)
    text: str
    char_start: list[int]
    char_end: list[int]
    stopped: bool
    judgement: Judgement
    ref_logps: np.ndarray | None = None  # log pi_ref of each token (set by with_reference_logprobs)

    @property
    def truth(self) -> np.ndarray:
        return token_truth(self.judgement, self.char_start, self.char_end, self.stopped)

    @property
    def errors(self) -> int:
        return self.judgement.errors


def _response(tokenizer, prompt: str, prompt_ids: list[int], ids: list[int], stop: set[int]) -> Response:
    text, starts, ends = token_spans(tokenizer, ids)
    stopped = bool(ids) and ids[-1] in stop
    return Response(prompt, prompt_ids, ids, text, starts, ends, stopped, judge(prompt, text))


def sample_responses(model, tokenizer, prompts: list[str], k: int, seed: int, max_new_tokens: int = 16):
    """``k`` responses per plain prompt, sampled at temperature 1 from the model itself: list of k-lists."""
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, batch_size=64)
    sampled = sample_token_ids(
        model, tokenizer, [messages(p) for p in prompts], k, sampling.model_copy(update={"seed": seed}), False
    )
    stop = stop_token_ids(model, tokenizer)
    return [
        [_response(tokenizer, p, row.prompt_ids, ids, stop) for ids in row.completions]
        for p, row in zip(prompts, sampled)
    ]


def given_response(tokenizer, prompt: str, text: str) -> Response:
    """A response with the given text, tokenized as the policy tokenizes its training completions."""
    ids = encode_completions(tokenizer, [assistant(text)])[0]
    prompt_ids = encode_prompts(tokenizer, [messages(prompt)])[0]
    return _response(tokenizer, prompt, prompt_ids, ids, {tokenizer.eos_token_id})


Pair = tuple[Response, Response]  # (chosen, rejected)


def build_pairs(groups: list[list[Response]], construction: str, rng: np.random.Generator) -> list[Pair]:
    """One pair per prompt whose samples differ in error count, the one with fewer errors chosen:
    ``best_vs_worst`` the fewest against the most, ``random`` two distinct samples drawn at random (the first
    draw whose error counts differ)."""
    pairs = []
    for group in groups:
        if construction == "best_vs_worst":
            ranked = sorted(group, key=lambda r: r.errors)
            candidates = [(ranked[0], ranked[-1])]
        elif construction == "random":
            order = [(int(i), int(j)) for i, j in (rng.permutation(len(group))[:2] for _ in range(8))]
            candidates = [(group[i], group[j]) for i, j in order]
        else:
            raise ValueError(f"unknown pair construction {construction!r}")
        for a, b in candidates:
            if a.errors != b.errors:
                pairs.append((a, b) if a.errors < b.errors else (b, a))
                break
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Token-reward sources: each maps pairs to (r_hat chosen, r_hat rejected) per token, in (-0.5, 0.5)

ORACLE_SCALE = 0.4  # |r_hat| of the oracles and controls: inside contrastive prompting's (-0.5, 0.5)
Rewards = list[tuple[np.ndarray, np.ndarray]]
Source = Callable[[list[Pair]], Rewards]


def oracle_dense(pairs: list[Pair]) -> Rewards:
    """The truth on every token: +s right, -s wrong."""
    return [(ORACLE_SCALE * chosen.truth, ORACLE_SCALE * rejected.truth) for chosen, rejected in pairs]


def _differing_terms(a: Response, b: Response) -> tuple[np.ndarray, np.ndarray]:
    """Per token of a and of b: does it overlap a term (or the stop token) where the two responses differ?"""

    def terms(r: Response) -> list[str]:
        return [r.text[s:e] for s, e in r.judgement.spans]

    ta, tb = terms(a), terms(b)
    out = []
    for r, own, other in ((a, ta, tb), (b, tb, ta)):
        marks = np.zeros(len(r.ids), dtype=np.float32)
        for i, (start, end) in enumerate(r.judgement.spans):
            if i >= len(other) or own[i] != other[i]:
                marks[tokens_over(r.char_start, r.char_end, (start, end))] = 1.0
        if r.stopped and len(own) != len(other):
            marks[-1] = 1.0
        out.append(marks)
    return out[0], out[1]


def oracle_sparse(pairs: list[Pair]) -> Rewards:
    """The truth only where the two responses differ (the T-REG paper's picture of token credit)."""
    out = []
    for chosen, rejected in pairs:
        mark_chosen, mark_rejected = _differing_terms(chosen, rejected)
        out.append((ORACLE_SCALE * chosen.truth * mark_chosen, ORACLE_SCALE * rejected.truth * mark_rejected))
    return out


def inverted_oracle(pairs: list[Pair]) -> Rewards:
    """A wrong r_hat: the truth with its sign flipped."""
    return [(-chosen, -rejected) for chosen, rejected in oracle_dense(pairs)]


def random_signs(seed: int) -> Source:
    """The oracle's positions with random signs: token labels that carry no information."""

    def source(pairs: list[Pair]) -> Rewards:
        rng = seeded(seed, 7)
        return [
            (
                np.abs(chosen) * rng.choice([-1.0, 1.0], len(chosen)),
                np.abs(rejected) * rng.choice([-1.0, 1.0], len(rejected)),
            )
            for chosen, rejected in oracle_dense(pairs)
        ]

    return source


def constant(pairs: list[Pair]) -> Rewards:
    """+s on every chosen token, -s on every rejected one: under DPO it only scales each pair's gradient by
    (1 + alpha * s), the same for all, so with Adam (and no clipping) it trains as DPO does: a unit test."""
    return [
        (np.full(len(chosen.ids), ORACLE_SCALE, np.float32), np.full(len(rejected.ids), -ORACLE_SCALE, np.float32))
        for chosen, rejected in pairs
    ]


def _each_response(score: Callable[[list[Response]], list[np.ndarray]]) -> Source:
    """A source that scores every response on its own (it never sees which side it is on)."""

    def source(pairs: list[Pair]) -> Rewards:
        flat = score([r for pair in pairs for r in pair])
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(pairs))]

    return source


def contrastive(reference, tokenizer, better: str, worse: str) -> Source:
    """T-REG contrastive prompting on the reference: r_hat_t = sigmoid(logp_better - logp_worse) - 0.5, with the
    templates (``{instruction}``, optional ``{response}``) of a preset or the gym's control instructions."""

    def score(responses: list[Response]) -> list[np.ndarray]:
        items = [
            ContrastiveItem(
                r.ids,
                r.char_start,
                r.char_end,
                r.prompt_ids,
                encode_prompts(tokenizer, [contrastive_messages(messages(r.prompt), r.text, better)])[0],
                encode_prompts(tokenizer, [contrastive_messages(messages(r.prompt), r.text, worse)])[0],
            )
            for r in responses
        ]
        return [result.rewards for result in score_contrastive(reference, items, 64, pad_token_id(tokenizer))]

    return _each_response(score)


def contrastive_sources(reference, tokenizer) -> dict[str, Source]:
    """The gym's control instructions and every T-REG preset."""
    sources = {"contrastive:control": contrastive(reference, tokenizer, CONTROLS["better"], CONTROLS["worse"])}
    for name, (better, worse) in TEMPLATE_PRESETS.items():
        sources[f"contrastive:{name}"] = contrastive(reference, tokenizer, better, worse)
    return sources


def abc_source(reward_model_dir: Path, beta: float = 0.8) -> Source:
    """ABC as a T-REG r_hat (the token-reward stage's regularizer form): the reward model's read-out attention over
    the response, spread over the policy's tokens, times its score standardized over the responses scored together,
    squashed into (-0.5, 0.5)."""
    rm_tokenizer, rm = load_abc_model(reward_model_dir, torch.device("cpu"), dtype=torch.float32)

    def score(responses: list[Response]) -> list[np.ndarray]:
        items = [encode_for_abc(rm_tokenizer, messages(r.prompt), assistant(r.text), 256) for r in responses]
        shares = [
            attention_shares(result.rewards, beta)
            for result in score_abc(rm, items, beta, 64, rm_tokenizer.pad_token_id)
        ]
        rewards = np.array([reward for reward, _ in shares])
        mean, std = float(rewards.mean()), max(float(rewards.std()), 1e-8)
        out = []
        for r, item, (reward, share) in zip(responses, items, shares):
            projected = project_rewards(share, item.char_start, item.char_end, r.char_start, r.char_end)
            out.append(bounded_rewards((reward - mean) / std, projected))
        return out

    return _each_response(score)


def dpo_implicit(policy, reference, tokenizer) -> Source:
    """The DPO-implicit token reward of a policy trained on other pairs (what RTO uses), as an r_hat:
    sigmoid(d_t / std(d)) - 0.5, d_t = log pi_dpo(y_t) - log pi_ref(y_t), std over the tokens scored together."""

    def score(responses: list[Response]) -> list[np.ndarray]:
        deltas = [
            p - r for p, r in zip(logprobs(policy, tokenizer, responses), logprobs(reference, tokenizer, responses))
        ]
        scale = float(np.concatenate(deltas).std()) or 1.0
        return [(1.0 / (1.0 + np.exp(-d / scale)) - 0.5).astype(np.float32) for d in deltas]

    return _each_response(score)


@torch.no_grad()
def logprobs(model, tokenizer, responses: list[Response], batch_size: int = 64) -> list[np.ndarray]:
    """log pi(y_t | plain prompt, y_<t) of every response token."""
    out = []
    for start in range(0, len(responses), batch_size):
        batch = responses[start : start + batch_size]
        ids, mask = padded_batch([r.prompt_ids + r.ids for r in batch], pad_token_id(tokenizer))
        lengths = [len(r.prompt_ids) for r in batch], [len(r.ids) for r in batch]
        out += [lp.numpy() for lp in completion_logprobs(model, ids, mask, *lengths)]
    return out


def with_reference_logprobs(reference, tokenizer, responses: list[Response]) -> None:
    """Store log pi_ref of every token on each response (the policy trainer's reference log-probs)."""
    for response, logps in zip(responses, logprobs(reference, tokenizer, responses)):
        response.ref_logps = logps


def policy_examples(pairs: list[Pair], rewards: Rewards | None) -> list[PolicyExample]:
    """The policy trainer's examples: both sides' ids, reference log-probs and r_hat (None for plain DPO)."""

    def side(r: Response, reward: np.ndarray | None) -> SideTokens:
        if r.ref_logps is None:
            raise ValueError("policy_examples: score the responses with with_reference_logprobs first")
        return SideTokens(r.prompt_ids, r.ids, r.ref_logps.tolist(), None if reward is None else reward.tolist())

    out = []
    for i, (chosen, rejected) in enumerate(pairs):
        r_chosen, r_rejected = rewards[i] if rewards is not None else (None, None)
        out.append(PolicyExample(f"pair-{i}", side(chosen, r_chosen), side(rejected, r_rejected)))
    return out


# ---------------------------------------------------------------------------------------------------------
# The audit (paired, within-slot) and the metrics


def slip(prompt: str, rng: np.random.Generator) -> tuple[str, str, int]:
    """(the right answer, the same answer with term j replaced by a wrong letter, j): the audit's item. Only term j
    differs, so both responses share the prefix before it."""
    right = task_of(prompt).expected(prompt, [])
    j = int(rng.integers(ANSWER_TERMS))
    wrong = list(right)
    wrong[j] = _letter(LETTERS.index(right[j]) + int(rng.integers(1, 26)))
    return " ".join(right), " ".join(wrong), j


def audit_score(source: Source, items: list[tuple[Response, Response, int]]) -> float:
    """The paired within-slot score of ``source`` on (right, wrong, slot) items, averaged over both role
    assignments, so a source that reads only which side is chosen scores 0.5."""
    scores = []
    for swap in (False, True):
        pairs = [((w, r) if swap else (r, w)) for r, w, _ in items]
        rewards = source(pairs)
        right, wrong = [], []
        for (r, w, j), (first, second) in zip(items, rewards):
            r_rewards, w_rewards = (second, first) if swap else (first, second)
            right.append(slot_mean(r_rewards, r.char_start, r.char_end, r.judgement.spans[j]))
            wrong.append(slot_mean(w_rewards, w.char_start, w.char_end, w.judgement.spans[j]))
        scores.append(paired_slot_score(right, wrong))
    return float(np.mean(scores))


@torch.no_grad()
def exact_answer_prob(model, tokenizer, prompts: list[str]) -> float:
    """The mean probability the model gives the right answer (teacher-forced, so without sampling noise)."""
    answers = [given_response(tokenizer, p, answer(p)) for p in prompts]
    return float(np.mean([np.exp(lp.sum()) for lp in logprobs(model, tokenizer, answers)]))


@torch.no_grad()
def sampled_error_rate(model, tokenizer, prompts: list[str], seed: int) -> float:
    """The share of wrong decisions (wrong, extra or missing terms over ANSWER_TERMS) in one sampled answer per
    prompt at temperature 1."""
    responses = sample_responses(model, tokenizer, prompts, 1, seed)
    return float(np.mean([min(r[0].errors / ANSWER_TERMS, 1.0) for r in responses]))
