"""Gold scorers: the judge a task is really measured by, as a function of (prompts, completions) -> one float each.

``vader`` is built in (vaderSentiment's compound score in [-1, 1], the bundled task's ground truth); any other is a
``package.module:function`` plugin with the same signature, imported from the installed environment (never from
workspace files).
"""

from __future__ import annotations

import importlib
from typing import Callable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from creditflow.tasks.data import schema as S

GoldScorer = Callable[[list[S.Messages], list[str]], list[float]]


def vader_scorer(prompts: list[S.Messages], completions: list[str]) -> list[float]:
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in completions]


def import_function(spec: str, key: str) -> Callable:
    """The function a ``package.module:function`` spec names, imported from the installed environment; an error
    names the config ``key``."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{key} {spec!r}: expected 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{key} {spec!r}: cannot import ({exc})") from exc
    if not callable(function):
        raise ValueError(f"{key} {spec!r}: not a function")
    return function


def load_gold_scorer(spec: str) -> GoldScorer:
    return vader_scorer if spec == "vader" else import_function(spec, "gold_scorer")
