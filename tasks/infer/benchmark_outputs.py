"""Each policy's answers to a prompt file, in the input formats of AlpacaEval and Arena-Hard, so a user can hand them
to those benchmarks' own judges.

Prompt files: AlpacaEval's evaluation set (a JSON list of ``{"instruction", "dataset"}``), Arena-Hard's
``question.jsonl`` (``{"question_id" or "uid", "category", "turns": [{"content"}]}`` or ``"prompt"``), or any JSON /
JSONL rows with an ``instruction`` or ``prompt`` field. Written, per system:

    alpaca_eval/<system>.json     [{"instruction", "output", "generator", "dataset"}]  (AlpacaEval's model_outputs)
    arena_hard/<system>.jsonl     {"question_id", "answer_id", "model_id", "choices": [{"index": 0,
                                   "turns": [{"content"}]}], "tstamp"}                   (Arena-Hard's model_answer)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class BenchmarkPrompt:
    question_id: str
    instruction: str
    dataset: str  # AlpacaEval's source set, Arena-Hard's category; "" when the file has none


def _instruction(row: dict[str, Any], where: str) -> str:
    if isinstance(row.get("instruction"), str):
        return row["instruction"]
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("content"), str):
        return turns[0]["content"]
    raise ValueError(f"{where}: no 'instruction', 'prompt' or 'turns[0].content' string")


def read_prompt_file(path: str | Path) -> list[BenchmarkPrompt]:
    """Prompts of an AlpacaEval or Arena-Hard file (JSON list or JSONL), with a clear error naming the bad row."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else None
        located = [(f"row {i + 1}", r) for i, r in enumerate(rows)] if rows is not None else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if located is None:
        located = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    located.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    prompts = []
    for location, row in located:
        where = f"{path} {location}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        question_id = str(row.get("question_id") or row.get("uid") or row.get("id") or len(prompts))
        dataset = str(row.get("dataset") or row.get("category") or "")
        prompts.append(BenchmarkPrompt(question_id, _instruction(row, where), dataset))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def write_outputs(out: Path, system: str, prompts: list[BenchmarkPrompt], answers: list[str]) -> list[Path]:
    """The two files of ``system`` under ``out`` (written whole, then renamed into place)."""
    alpaca = [
        {"instruction": p.instruction, "output": a, "generator": system, "dataset": p.dataset}
        for p, a in zip(prompts, answers)
    ]
    now = time.time()
    arena = [
        {
            "question_id": p.question_id,
            "answer_id": hashlib.sha256(f"{system}\0{p.question_id}\0{a}".encode()).hexdigest()[:22],
            "model_id": system,
            "choices": [{"index": 0, "turns": [{"content": a}]}],
            "tstamp": now,
        }
        for p, a in zip(prompts, answers)
    ]
    files = {
        out / "alpaca_eval" / f"{system}.json": json.dumps(alpaca, indent=2, ensure_ascii=False) + "\n",
        out / "arena_hard" / f"{system}.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in arena),
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(content, encoding="utf-8")
        partial.replace(path)
    return list(files)
