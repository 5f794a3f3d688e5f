"""Figures stages log to MLflow."""

import ast
from pathlib import Path

import creditflow.tasks


def test_every_legend_has_a_fixed_location():
    """``loc="best"`` (matplotlib's default) searches the plotted data and warns that it is slow on a loaded machine;
    a stage's figures name their corner instead."""
    unplaced = []
    for source in Path(creditflow.tasks.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "legend":
                if not any(k.arg == "loc" for k in node.keywords):
                    unplaced.append(f"{source.name}:{node.lineno}")
    assert not unplaced, f"legend() without loc= at {', '.join(unplaced)}"
