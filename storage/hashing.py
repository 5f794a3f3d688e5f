"""Content hashing: canonical JSON, files, code versions. Every cache key in CreditFlow is built from these."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import creditflow

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_text(canonical_json(obj))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Digest of every file under ``root`` (relative path + content), independent of walk order."""
    root = Path(root)
    entries = {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return sha256_json(entries)


def code_version(modules: Iterable[str]) -> str:
    """Package version plus a digest of the source of the modules (dotted names) that shape a stage's rows.

    Modules are found, not imported, so planning a stage costs no torch import."""
    sources = {name: _source_digest(name) for name in modules}
    return f"{creditflow.__version__}+{sha256_json(sources)[:12]}"


@lru_cache(maxsize=None)
def _source_digest(module: str) -> str:
    """Digest of the module's code without its comments, docstrings and layout (an edited comment computes no row
    differently, so it must not recompute a stage); a new Python may print the same code differently, which costs
    one recompute.

    Read once per process: a source file edited while a pipeline runs must not change the fingerprints the
    running code computes (the code in memory is still the old one, and later stages would miss their upstream)."""
    return sha256_text(code_text(module_source(module)))


@lru_cache(maxsize=None)
def module_source(module: str) -> str:
    """The source text of ``module`` (a dotted name), found and not imported, read once per process (so the stage
    registry's import walk and the code digests see the same text)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(f"no source for module {module!r}")
    return Path(spec.origin).read_text(encoding="utf-8")


def code_text(source: str) -> str:
    """``source`` printed back from its syntax tree, docstrings dropped: what runs, not how it is written."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def git_commit() -> str | None:
    """The checkout's commit, recorded for humans; never part of a cache key."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
