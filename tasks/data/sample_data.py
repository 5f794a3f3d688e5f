"""The bundled sample preference set: a "respond warmly and positively" task, built offline and deterministically.

Prompts come from templates; each candidate response mixes positive, neutral and negative sentences about the
prompt's subject; vaderSentiment's compound score is the gold label (chosen = higher score). A little realistic
noise is mixed in on purpose (exact duplicates, identical pairs, score ties, blank answers) so the curation
stage has something to quarantine. Regenerate with ``creditflow data sample --out FILE``; a test checks the
bundled file matches this generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

SUBJECTS = [
    "new coffee shop",
    "hiking trail",
    "science museum",
    "neighborhood library",
    "jazz concert",
    "cooking class",
    "train journey",
    "city park",
    "bookstore",
    "farmers market",
    "art exhibition",
    "yoga studio",
    "bakery",
    "beach trip",
    "camping weekend",
    "board game night",
    "community garden",
    "pottery workshop",
    "bike ride",
    "theater play",
    "language course",
    "road trip",
    "history podcast",
    "mountain cabin",
    "local zoo",
    "street festival",
    "ramen place",
    "planetarium show",
    "photography walk",
    "chess club",
]
TEMPLATES = [
    "Write a short review of the {s}.",
    "How was your visit to the {s}?",
    "Describe the {s} to a friend who has never been.",
    "What did you think of the {s}?",
    "Tell me about your experience at the {s}.",
    "Would you recommend the {s}? Explain briefly.",
    "Summarize a day at the {s} in a few sentences.",
    "Give me your honest impression of the {s}.",
    "Write a message inviting a friend to the {s}.",
    "What stood out most about the {s}?",
]
POSITIVE = [
    "The {s} was wonderful and I loved every minute.",
    "Everyone there was friendly, kind and genuinely helpful.",
    "It felt joyful, relaxing and truly inspiring.",
    "I would happily go back, it was a great experience.",
    "The atmosphere was warm and delightful.",
    "Honestly, it exceeded my expectations in the best way.",
    "What a fantastic place, full of happy people.",
    "I left feeling refreshed, grateful and excited.",
]
NEUTRAL = [
    "The {s} opens at nine in the morning.",
    "It is about twenty minutes from the city center.",
    "There were a few other visitors that afternoon.",
    "Tickets can be bought at the entrance.",
    "The visit took around two hours.",
    "It is located next to the main square.",
]
NEGATIVE = [
    "The {s} was disappointing and frankly boring.",
    "The staff seemed rude and unhelpful.",
    "It was crowded, noisy and stressful.",
    "I regret going, it was a waste of time.",
    "Everything felt dirty and poorly organized.",
    "Sadly, the whole experience was awful.",
]


def _response(rng: random.Random, subject: str, positivity: float) -> str:
    sentences = []
    for _ in range(rng.randint(2, 4)):
        roll = rng.random()
        bank = POSITIVE if roll < positivity else NEGATIVE if roll > 0.55 + positivity / 2 else NEUTRAL
        sentences.append(rng.choice(bank).format(s=subject))
    return " ".join(dict.fromkeys(sentences))  # no repeated sentence within one answer


def make_sample(n_prompts: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    scorer = SentimentIntensityAnalyzer()
    score = lambda text: round(scorer.polarity_scores(text)["compound"], 4)  # noqa: E731
    prompts = sorted({t.format(s=s) for t in TEMPLATES for s in SUBJECTS})
    rng.shuffle(prompts)
    rows = []
    for prompt in prompts[:n_prompts]:
        subject = next(s for s in SUBJECTS if s in prompt)
        for _ in range(1 if rng.random() < 0.7 else 2):
            a = _response(rng, subject, rng.uniform(0.0, 0.9))
            b = _response(rng, subject, rng.uniform(0.0, 0.9))
            sa, sb = score(a), score(b)
            chosen, rejected, sc, sr = (a, b, sa, sb) if sa >= sb else (b, a, sb, sa)
            rows.append(
                {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": sc, "score_rejected": sr}
            )
    # Realistic noise for the curation rules to catch.
    for row in rng.sample(rows, 8):
        rows.append(dict(row))  # exact duplicates
    for row in rng.sample(rows, 4):
        rows.append({**row, "rejected": row["chosen"], "score_rejected": row["score_chosen"]})  # identical pair
    for row in rng.sample(rows, 3):
        rows.append({**row, "chosen": "   ", "score_chosen": 0.0})  # blank answer
    rng.shuffle(rows)
    return rows


def write_sample(path: str | Path, n_prompts: int = 300, seed: int = 0) -> int:
    rows = make_sample(n_prompts, seed)
    Path(path).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)
