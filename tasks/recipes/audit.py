"""Token-reward audit: do the token rewards point the right way?

The probe (tasks/credit/audit_probes.py) is a set of responses with known bad character spans. Each source gives every
response token a score, higher meaning better: contrastive r̂ per template preset, ABC's redistributed reward, the
DPO-implicit reward β·(log π − log π_ref) of a trained policy, and the reference log-prob (surprisal, negated) as
the trivial baseline. Per source and probe kind:

- **paired** (the headline): the share of items whose bad tokens score below the tokens at the same characters of
  the correct answer, ties half (items that have a correct answer). This is the question T-REG needs answered:
  does r̂ rank the wrong token below the right one at the same place? 1 is perfect, 0.5 chance, below 0.5 the
  source points the wrong way.
- **pooled AUC** (secondary): P(score of a bad token < score of another token) over all (bad, other) token pairs of
  the pool, ties half. The other tokens are mostly the frame around the slot, so this rewards telling the slot from
  its frame (position), not right from wrong: the plain reference surprisal does well on it.
- **coverage**: the share of items with at least one token on a bad span (truncation can cut it off).

Besides one row per kind, ``planted`` pools the planted-error kinds and ``all`` every item. ``planted-known`` keeps
the planted errors the reference model itself gets right (its log-prob is lower at the wrong tokens than at the right
answer's): where the model does not know the answer, no prompt can make it flag the error, so this row separates a
template that fails from a model that does not know. Selected by the reference log-prob, that source's own paired
score there is 1 by construction, and presets close to the plain prompt (``prefix``: one line before it) inherit
much of that selection; the row's ``note`` says so wherever it prints. The ``sentiment`` probe is built from the
bundled sample's chosen responses, which the demo's reward model and policy train on: its ``abc`` and
``dpo-implicit`` rows score text those models were trained on, and its note says that too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from matplotlib.patches import Patch

from creditflow.tasks.configs import TEMPLATE_PRESETS, TokenRewardsConfig
from creditflow.tasks.credit import attention_credit, contrastive
from creditflow.tasks.credit.audit_probes import AUC_WARNING, KINDS, PLANTED_KINDS, ProbeItem, build_probe
from creditflow.tasks.data.schema import Messages
from creditflow.tasks.models.causal_lm import trained_model_folder
from creditflow.tasks.models.loading import load_abc_model, load_reference_model, load_tokenizer
from creditflow.tasks.models.logprobs import completion_logprobs
from creditflow.tasks.models.precision import Precision, reference_precision, resolve_device
from creditflow.tasks.models.resolve import resolve_model
from creditflow.tasks.models.tokenization import pad_token_id, padded_batch
from creditflow.tasks.plots import finish, new_figure

logger = logging.getLogger(__name__)
REFERENCE = "reference log-prob"


# ---------------------------------------------------------------------------------------------------------
# Metrics


# ---------------------------------------------------------------------------------------------------------
# The stage: config -> setup -> run -> save


def compute_audit(ctx) -> dict[str, float]:
    """Audit the reference model's contrastive presets, the reward model's ABC and the trained policy's DPO-implicit
    reward on the probe; write ``audit`` (one row per source and probe kind) and log the table and a plot."""

    config = ctx.config
    probe = build_probe(config.per_kind, config.sentiment, config.seed, config.probe)
    reference = resolve_model(ctx.reference_model)
    reward_model, policy_artifact = ctx.reward_model_folder(), ctx.upstream_dir("policy")
    trust = ctx.remote_code_allowed(reference, reward_model, policy_artifact)
    policy = trained_model_folder(policy_artifact, trust)
    rows = run_audit(
        reference,
        {name: TEMPLATE_PRESETS[name] for name in config.presets},
        probe,
        max_length=config.max_length,
        batch_size=config.batch_size,
        reward_model=reward_model,
        reward_model_max_length=int(ctx.upstream["reward_model"].config["max_length"]),
        policy=policy,
        beta=float(ctx.upstream["policy"].config["loss"]["beta"]),
        trust_remote_code=trust,
    )
    for row in rows:
        if row.kind == "all" and row.paired < AUC_WARNING:
            logger.warning(
                "audit: %s points the wrong way (paired score %.3f < 0.5 on %d items)",
                row.source,
                row.paired,
                row.items,
            )
    ctx.writer.write_table("audit", pa.Table.from_pylist([asdict(r) for r in rows]))
    ctx.run.log_rows([asdict(r) for r in rows], "audit/table.json")
    ctx.run.log_figure(audit_figure(rows), "audit/paired.png")
    metrics = {f"{r.source}.{r.kind}.paired": r.paired for r in rows if r.paired == r.paired}
    return metrics | {f"{r.source}.{r.kind}.auc": r.auc for r in rows if r.auc == r.auc} | {"items": len(probe)}


def auc(bad: np.ndarray, other: np.ndarray) -> float:
    """P(bad < other) + ½ P(bad == other): 1 when every bad score is below every other score."""
    bad, other = np.asarray(bad, dtype=np.float64), np.sort(np.asarray(other, dtype=np.float64))
    if not len(bad) or not len(other):
        return float("nan")
    above = len(other) - np.searchsorted(other, bad, side="right")  # others strictly above each bad score
    ties = np.searchsorted(other, bad, side="right") - np.searchsorted(other, bad, side="left")
    return float((above + 0.5 * ties).sum() / (len(bad) * len(other)))


def _overlaps(starts, ends, spans) -> np.ndarray:
    starts, ends = np.asarray(starts), np.asarray(ends)
    hit = np.zeros(len(starts), dtype=bool)
    for s, e in spans:
        hit |= (np.minimum(ends, e) - np.maximum(starts, s)) > 0
    return hit


@dataclass
class TokenScores:
    """One response's token scores (higher = better) and each token's character span in the response."""

    scores: np.ndarray
    char_start: list[int]
    char_end: list[int]


Scorer = Callable[[list[Messages], list[str]], list[TokenScores]]


NOTES = {
    "planted-known": "selected by the reference log-prob: favours the reference and presets near the plain prompt",
    "sentiment": "built from the bundled sample's chosen responses: models trained on that sample have seen it",
}


@dataclass
class AuditRow:
    source: str
    kind: str
    items: int
    paired: float  # the headline: the wrong token below the right one at the same place, ties half
    auc: float  # pooled over every (bad, other) token pair: secondary
    bad_tokens: int
    coverage: float
    note: str = ""


@dataclass
class ItemScores:
    """One probe item under one source: its bad tokens' scores, the other tokens' scores, and whether the bad tokens
    score below the correct answer's tokens at the same characters (None without a correct answer to compare)."""

    kind: str
    bad: np.ndarray
    other: np.ndarray
    paired: float | None


def score_items(scorer: Scorer, probe: list[ProbeItem]) -> list[ItemScores]:
    corrupted = scorer([i.prompt for i in probe], [i.response for i in probe])
    with_original = [j for j, i in enumerate(probe) if i.original is not None]
    originals = dict(
        zip(with_original, scorer([probe[j].prompt for j in with_original], [probe[j].original for j in with_original]))
    )
    per_item = []
    for j, (item, scored) in enumerate(zip(probe, corrupted)):
        real = np.asarray(scored.char_end) > np.asarray(scored.char_start)  # EOS has an empty span: not text
        bad = _overlaps(scored.char_start, scored.char_end, item.bad_spans) & real
        paired = None
        if j in originals and bad.any():
            ref = originals[j]
            right = _overlaps(ref.char_start, ref.char_end, item.original_spans)
            if right.any():
                wrong_mean, right_mean = scored.scores[bad].mean(), ref.scores[right].mean()
                paired = float(wrong_mean < right_mean) + 0.5 * float(wrong_mean == right_mean)
        per_item.append(ItemScores(item.kind, scored.scores[bad], scored.scores[real & ~bad], paired))
    return per_item


def known_items(reference: list[ItemScores]) -> set[int]:
    """The planted errors the reference model gets right: lower log-prob at the wrong tokens than at the right ones."""
    return {j for j, item in enumerate(reference) if item.kind in PLANTED_KINDS and item.paired == 1.0}


def summarize(name: str, per_item: list[ItemScores], known: set[int] | None = None) -> list[AuditRow]:
    """Rows for every probe kind present, one for the planted-error kinds together (``planted``, when there are
    several), one for the planted errors in ``known`` (``planted-known``) and one for every item (``all``)."""
    groups = {k: [j for j, p in enumerate(per_item) if p.kind == k] for k in KINDS}
    groups = {k: members for k, members in groups.items() if members}
    planted = [j for j, p in enumerate(per_item) if p.kind in PLANTED_KINDS]
    if sum(k in groups for k in PLANTED_KINDS) > 1:
        groups["planted"] = planted
    if known is not None and planted:
        groups["planted-known"] = [j for j in planted if j in known]
    groups["all"] = list(range(len(per_item)))
    rows = []
    for kind, members in groups.items():
        chosen = [per_item[j] for j in members]
        bad = np.concatenate([p.bad for p in chosen]) if chosen else np.array([])
        other = np.concatenate([p.other for p in chosen]) if chosen else np.array([])
        paired = [p.paired for p in chosen if p.paired is not None]
        rows.append(
            AuditRow(
                name,
                kind,
                len(chosen),
                float(np.mean(paired)) if paired else float("nan"),
                auc(bad, other),
                len(bad),
                float(np.mean([len(p.bad) > 0 for p in chosen])) if chosen else float("nan"),
                NOTES.get(kind, ""),
            )
        )
    return rows


def audit_source(name: str, scorer: Scorer, probe: list[ProbeItem], known: set[int] | None = None) -> list[AuditRow]:
    """:func:`summarize` of one source's :func:`score_items`."""
    return summarize(name, score_items(scorer, probe), known)


def audit_figure(rows: list[AuditRow]):
    """The paired score per source: every item, the planted errors, and those the reference model knows (a
    selection that favours the reference); red below 0.5."""

    sources = list(dict.fromkeys(r.source for r in rows))
    pools = [k for k in ("all", "planted", "planted-known") if any(r.kind == k for r in rows)]
    by_key = {(r.source, r.kind): r.paired for r in rows}
    fig, (ax,) = new_figure(1, (max(6, 1.4 * len(sources)), 3.8))
    width, colors = 0.8 / len(pools), ("#4f81bd", "#9bbb59", "#8064a2")
    for p, (pool, color) in enumerate(zip(pools, colors)):
        values = [by_key.get((s, pool), float("nan")) for s in sources]
        x = [i + (p - (len(pools) - 1) / 2) * width for i in range(len(sources))]
        bars = ax.bar(x, values, width, color=color)
        for bar, value in zip(bars, values):
            if value < AUC_WARNING:
                bar.set_edgecolor("#c0504d")
                bar.set_linewidth(2)
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(sources)), sources, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("paired score (wrong below right, same place)")
    ax.set_title("token-reward audit (red edge: below 0.5, the wrong way)", fontsize=10)
    ax.legend(handles=[Patch(color=c, label=pool) for pool, c in zip(pools, colors)], fontsize=7, loc="lower right")
    return finish(fig)


# ---------------------------------------------------------------------------------------------------------
# Sources


def _completion(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


@dataclass
class Reference:
    """The reference model loaded once for every source that reads it, at the token-reward stage's precision."""

    model: object
    tokenizer: object
    pad: int
    device: object
    max_length: int | None
    batch_size: int
    precision: Precision

    def autocast(self):
        return self.precision.autocast(self.device)

    def encode(self, prompts, texts, config=None):
        config = config or TokenRewardsConfig(max_length=self.max_length)
        return contrastive.encode_contrastive(self.tokenizer, prompts, [_completion(t) for t in texts], config)


def _contrastive_scorers(ref: Reference, better: str, worse: str) -> tuple[Scorer, Scorer]:
    """(r̂ scorer, reference log-prob scorer) of one preset: one contrastive pass per probe, shared by both."""

    config = TokenRewardsConfig(
        template="custom", better_template=better, worse_template=worse, max_length=ref.max_length
    )
    seen: dict = {}

    def scores(prompts, texts, which: str) -> list[TokenScores]:
        key = (tuple(map(str, prompts)), tuple(texts))
        if key not in seen:
            items = ref.encode(prompts, texts, config)
            with ref.autocast():
                seen[key] = items, contrastive.score_contrastive(ref.model, items, ref.batch_size, ref.pad)
        items, results = seen[key]
        return [
            TokenScores(np.asarray(getattr(r, which), np.float64), i.char_start, i.char_end)
            for i, r in zip(items, results)
        ]

    return (lambda p, t: scores(p, t, "rewards")), (lambda p, t: scores(p, t, "ref_logps"))


def _implicit_scorer(ref: Reference, policy: str | Path, beta: float, trust_remote_code: bool = False) -> Scorer:
    """β·(log π − log π_ref) per token: what DPO's training made of each token."""

    dtype = next(ref.model.parameters()).dtype
    trained = load_reference_model(policy, ref.device, dtype, trust_remote_code)

    @torch.no_grad()
    def implicit(prompts, texts):
        out = []
        for item in ref.encode(prompts, texts):
            ids, mask = padded_batch([item.plain_ids + item.completion_ids], ref.pad)
            args = (ids.to(ref.device), mask.to(ref.device), [len(item.plain_ids)], [len(item.completion_ids)])
            with ref.autocast():
                logp_policy = completion_logprobs(trained, *args)[0].cpu().numpy()
                logp_ref = completion_logprobs(ref.model, *args)[0].cpu().numpy()
            out.append(TokenScores(beta * (logp_policy - logp_ref), item.char_start, item.char_end))
        return out

    return implicit


def _abc_scorers(
    folder: str | Path, max_length: int, beta: float, batch_size: int, device, trust_remote_code: bool = False
) -> tuple[Scorer, Scorer]:
    """(official ABC, centered ABC): the stored form (Σ r_t = r) and the regularizer's (standardized over the
    probe's responses, spread by attention, bounded)."""

    tokenizer, model = load_abc_model(folder, device, torch.float32, trust_remote_code)

    def scores(prompts, texts, centered: bool):
        items = [
            attention_credit.encode_for_abc(tokenizer, p, _completion(t), max_length) for p, t in zip(prompts, texts)
        ]
        results = attention_credit.score_abc(model, items, beta, batch_size, tokenizer.pad_token_id)
        values = [np.asarray(r.rewards, np.float64) for r in results]
        if centered:
            scalars = np.array([r.reward for r in results])
            mean, std = scalars.mean(), max(scalars.std(), 1e-8)
            values = [
                attention_credit.bounded_rewards((r.reward - mean) / std, attention_credit.attention_shares(v, beta)[1])
                for r, v in zip(results, values)
            ]
        return [TokenScores(np.asarray(v, np.float64), i.char_start, i.char_end) for i, v in zip(items, values)]

    return (lambda p, t: scores(p, t, False)), (lambda p, t: scores(p, t, True))


def run_audit(
    reference: str | Path,
    presets: dict[str, tuple[str, str]],
    probe: list[ProbeItem],
    *,
    max_length: int | None = 512,
    batch_size: int = 8,
    reward_model: str | Path | None = None,
    reward_model_max_length: int = 512,
    abc_beta: float = 0.8,
    policy: str | Path | None = None,
    beta: float = 0.1,
    trust_remote_code: bool = False,
) -> list[AuditRow]:
    """Audit every source the arguments make available: contrastive r̂ per preset and the reference log-prob
    (always), the DPO-implicit reward (with a trained ``policy``), ABC (with a ``reward_model``)."""

    device = resolve_device()
    tokenizer = load_tokenizer(str(reference), trust_remote_code)
    precision = reference_precision("auto", device)  # what token_rewards.dtype: auto scores with (full fine-tuning)
    model = load_reference_model(reference, device, precision.weights, trust_remote_code)
    ref = Reference(model, tokenizer, pad_token_id(tokenizer), device, max_length, batch_size, precision)
    sources: dict[str, Scorer] = {}
    for index, (preset, (better, worse)) in enumerate(presets.items()):
        sources[f"contrastive:{preset}"], logprob = _contrastive_scorers(ref, better, worse)
        if index == 0:  # the reference log-prob is the same under every preset
            sources[REFERENCE] = logprob
    if policy is not None:
        sources["dpo-implicit"] = _implicit_scorer(ref, policy, beta, trust_remote_code)
    if reward_model is not None:
        official, centered = _abc_scorers(
            reward_model, reward_model_max_length, abc_beta, batch_size, device, trust_remote_code
        )
        sources |= {"abc-official": official, "abc-centered": centered}
    scores = {name: score_items(scorer, probe) for name, scorer in sources.items()}
    known = known_items(scores[REFERENCE]) if REFERENCE in scores else None
    return [row for name, per_item in scores.items() for row in summarize(name, per_item, known)]
