"""Contrastive template wordings under the token-reward audit, against the reference log-prob baseline.

    .venv/bin/python bench/template_presets.py [--model smollm2] [--seed 1] [--per-kind 25] [--sentiment 30]
        [--candidates NAME ...]

The guideline and prefix presets plus other wordings tried when choosing the default (docs/benchmarks.md). Prints
one line per source and probe kind; the same numbers as ``creditflow rewards audit`` for the presets.
"""

from __future__ import annotations

import argparse

from creditflow.flows.env import apply_defaults

apply_defaults()

CANDIDATES = {
    "accuracy": (
        "{instruction}\n\nAnswer accurately: every fact and number in your response must be correct.",
        "{instruction}\n\nAnswer inaccurately: the facts and numbers in your response must be wrong.",
    ),
    "correct-wrong": (
        "{instruction}\n\nGive a correct and helpful answer.",
        "{instruction}\n\nGive a wrong and unhelpful answer.",
    ),
    "prefix-helpful": (
        "Answer correctly and helpfully. {instruction}",
        "Answer incorrectly and unhelpfully. {instruction}",
    ),
    "guideline-first": (
        "Your response should be helpful, correct, coherent, and concise.\n\n{instruction}",
        "Your response should be unhelpful, incorrect, incoherent, and verbose.\n\n{instruction}",
    ),
    "prefix-guideline": (
        "Answer correctly. {instruction}\n\nYour response should be helpful, correct, coherent, and concise.",
        "Answer incorrectly. {instruction}\n\nYour response should be unhelpful, incorrect, incoherent, and verbose.",
    ),
    "prefix-both-ends": (
        "Answer correctly. {instruction} Answer correctly.",
        "Answer incorrectly. {instruction} Answer incorrectly.",
    ),
    "one-mistake": ("Answer correctly. {instruction}", "Answer with one mistake. {instruction}"),
    "falsely": ("Answer correctly. {instruction}", "Answer falsely. {instruction}"),
    "demonstration": (
        "Example of a correct answer:\nQ: What colour is a clear daytime sky?\nA: Blue.\n\n"
        "Answer correctly. {instruction}",
        "Example of an incorrect answer:\nQ: What colour is a clear daytime sky?\nA: Green.\n\n"
        "Answer incorrectly. {instruction}",
    ),
}


def main() -> None:
    from creditflow.tasks.configs import TEMPLATE_PRESETS
    from creditflow.tasks.credit.audit_probes import build_probe
    from creditflow.tasks.models.resolve import resolve_model
    from creditflow.tasks.recipes import audit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-kind", type=int, default=25)
    parser.add_argument("--sentiment", type=int, default=30)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), help="Wordings besides the presets.")
    args = parser.parse_args()
    probe = build_probe(args.per_kind, args.sentiment, args.seed)
    presets = {name: TEMPLATE_PRESETS[name] for name in ("guideline", "prefix")}
    presets |= {name: CANDIDATES[name] for name in args.candidates}
    for row in audit.run_audit(resolve_model(args.model), presets, probe, max_length=512):
        print(f"{row.source:26} {row.kind:13} items={row.items:3} paired={row.paired:.3f} auc={row.auc:.3f}")


if __name__ == "__main__":
    main()
