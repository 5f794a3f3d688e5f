"""The token-reward audit's probe: responses with known bad character spans, built offline and seeded.

- ``arithmetic``, ``counting``, ``ordering``, ``units``, ``sequence`` (the day or month after another),
  ``capitals``: answers whose truth is computed (or, for capitals, looked up in a table), with one number or word
  replaced by a wrong one; the correct answer is kept, so the same position can be compared;
- ``sentiment``: responses of the bundled "respond warmly" task with one positive word flipped to a negative one
  (vaderSentiment's lexicon confirms the flip: positive valence before, negative after);
- ``user``: a JSONL of ``{"prompt", "response", "bad_spans": [[start, end], ...]}``.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from creditflow.tasks.configs import SourceConfig
from creditflow.tasks.data.ingest import source_path
from creditflow.tasks.data.schema import Messages

PLANTED_KINDS = ("arithmetic", "counting", "ordering", "units", "sequence", "capitals")
KINDS = (*PLANTED_KINDS, "sentiment", "user")

AUC_WARNING = 0.5  # an audit score below this ranks the planted errors above the right tokens: worse than chance


@dataclass
class ProbeItem:
    kind: str
    prompt: Messages
    response: str  # with the planted error
    bad_spans: list[tuple[int, int]]  # character spans of ``response`` that are wrong
    original: str | None = None  # the correct response, when there is one
    original_spans: list[tuple[int, int]] = field(default_factory=list)  # the same positions in ``original``


def _user(text: str) -> Messages:
    return [{"role": "user", "content": text}]


def planted_item(kind: str, question: str, template: str, right: str, wrong: str) -> ProbeItem:
    """``template`` holds one ``{}`` where the answer goes. The bad span starts where the wrong answer departs from
    the right one: in 48 for 47 the 4 is still right when it is read (digits are tokens of their own), and when the
    wrong answer stops short (60 for 600) the departure is the character after it."""
    start = template.index("{}")
    response, original = template.format(wrong), template.format(right)
    shared = len(os.path.commonprefix([right, wrong]))
    bad_end = start + len(wrong) + (1 if shared == len(wrong) else 0)
    return ProbeItem(
        kind, _user(question), response, [(start + shared, bad_end)], original, [(start + shared, start + len(right))]
    )


WORDS = ["apple", "river", "window", "garden", "planet", "yellow", "pencil", "orange", "silver", "bridge", "kitten"]
WORDS += ["mountain", "library", "teacher", "blanket", "forest", "camera", "rocket", "violin", "island", "dragon"]
UNITS = [("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("hours", "minutes", 60)]
UNITS += [("minutes", "seconds", 60), ("kilometers", "meters", 1000), ("days", "hours", 24), ("weeks", "days", 7)]
SEQUENCES = {
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
    + ["November", "December"],
}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid"}
CAPITALS |= {"England": "London", "Russia": "Moscow", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa"}
CAPITALS |= {"Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo"}
CAPITALS |= {"Sweden": "Stockholm", "Poland": "Warsaw", "Kenya": "Nairobi", "Peru": "Lima", "Thailand": "Bangkok"}


def planted_error_probe(n_per_kind: int = 40, seed: int = 0) -> list[ProbeItem]:
    """Answers whose truth is computed or tabulated, each with one wrong number or word (``n_per_kind`` per kind)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n_per_kind):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("times", a * b)])
        wrong = value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
        question = f"What is {a} {op} {b}?"
        items.append(planted_item("arithmetic", question, f"{a} {op} {b} is {{}}.", str(value), str(wrong)))
    for _ in range(n_per_kind):
        word = rng.choice(WORDS)
        wrong = len(word) + rng.choice([-2, -1, 1, 2, 3])
        question = f'How many letters are in the word "{word}"?'
        items.append(
            planted_item("counting", question, f'The word "{word}" has {{}} letters.', str(len(word)), str(wrong))
        )
    for _ in range(n_per_kind):
        a, b = rng.sample(range(1, 1000), 2)
        big, small = max(a, b), min(a, b)
        question = f"Which number is larger, {a} or {b}?"
        items.append(
            planted_item("ordering", question, f"{{}} is the larger number of {a} and {b}.", str(big), str(small))
        )
    for _ in range(n_per_kind):
        big_unit, small_unit, factor = rng.choice(UNITS)
        k = rng.randint(2, 12)
        wrong = k * factor * rng.choice([10, 2]) if rng.random() < 0.5 else k * factor // rng.choice([10, 2]) or 1
        question = f"How many {small_unit} are in {k} {big_unit}?"
        template = f"There are {{}} {small_unit} in {k} {big_unit}."
        items.append(planted_item("units", question, template, str(k * factor), str(wrong)))
    for _ in range(n_per_kind):
        unit, names = rng.choice(sorted(SEQUENCES.items()))
        i = rng.randrange(len(names))
        right = names[(i + 1) % len(names)]
        wrong = rng.choice([n for n in names if n not in (right, names[i])])
        question = f"Which {unit} comes after {names[i]}?"
        items.append(planted_item("sequence", question, f"The {unit} after {names[i]} is {{}}.", right, wrong))
    for _ in range(n_per_kind):
        country = rng.choice(sorted(CAPITALS))
        wrong = rng.choice([c for c in sorted(CAPITALS.values()) if c != CAPITALS[country]])
        question = f"What is the capital of {country}?"
        items.append(planted_item("capitals", question, f"The capital of {country} is {{}}.", CAPITALS[country], wrong))
    return items


FLIPS = {
    "friendly": "rude",
    "kind": "cruel",
    "helpful": "useless",
    "joyful": "miserable",
    "relaxing": "stressful",
    "inspiring": "depressing",
    "refreshed": "exhausted",
    "grateful": "resentful",
    "excited": "bored",
    "wonderful": "terrible",
    "lovely": "awful",
    "beautiful": "ugly",
    "delightful": "dreadful",
    "great": "awful",
    "best": "worst",
    "happy": "sad",
    "fantastic": "horrible",
    "pleasant": "unpleasant",
}


def sentiment_flip_probe(n: int = 60, seed: int = 0) -> list[ProbeItem]:
    """The bundled task's responses with one positive word flipped to a negative one (vader-checked)."""

    lexicon = SentimentIntensityAnalyzer().lexicon
    flips = {good: bad for good, bad in FLIPS.items() if lexicon.get(good, 0) > 0 > lexicon.get(bad, 0)}
    pattern = re.compile(r"\b(" + "|".join(flips) + r")\b")
    rows = [json.loads(line) for line in source_path(SourceConfig(builtin="sample")).read_text().splitlines()]
    candidates = list(dict.fromkeys((r["prompt"], r["chosen"]) for r in rows if pattern.search(r["chosen"])))
    random.Random(seed).shuffle(candidates)
    items = []
    for prompt, text in candidates[:n]:
        match = pattern.search(text)
        bad = flips[match.group(1)]
        response = text[: match.start()] + bad + text[match.end() :]
        span = (match.start(), match.start() + len(bad))
        items.append(ProbeItem("sentiment", _user(prompt), response, [span], text, [(match.start(), match.end())]))
    return items


def user_probe(path: str | Path) -> list[ProbeItem]:
    """``{"prompt": str or messages, "response": str, "bad_spans": [[start, end], ...]}`` per line."""
    items = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
            prompt = _user(row["prompt"]) if isinstance(row["prompt"], str) else row["prompt"]
            response, spans = row["response"], [tuple(s) for s in row["bad_spans"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}: expected prompt, response and bad_spans ({exc})") from None
        if not isinstance(response, str) or not all(len(s) == 2 and 0 <= s[0] < s[1] <= len(response) for s in spans):
            raise ValueError(f"{where}: field 'bad_spans': each span is [start, end) inside the response")
        items.append(ProbeItem("user", prompt, response, spans))
    return items


def build_probe(per_kind: int, sentiment: int, seed: int, user_path: str | Path | None = None) -> list[ProbeItem]:
    """The audit's probe: ``per_kind`` planted errors per kind, ``sentiment`` flips and the user's JSONL, if any."""
    items = planted_error_probe(per_kind, seed) + sentiment_flip_probe(sentiment, seed)
    return items + (user_probe(user_path) if user_path else [])
