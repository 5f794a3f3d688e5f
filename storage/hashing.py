"""Content hashing: canonical JSON, files, code versions. Every cache key in CreditFlow is built from these."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import subprocess
import threading
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


# CPython 3.11.7's ast.parse keeps its recursion-depth count per process, not per thread, so two threads parsing
# at once can fail with "AST constructor recursion depth mismatch" (gh-106905); Prefect runs tasks in threads.
_PARSE_LOCK = threading.Lock()


def _parse(source: str) -> ast.Module:
    with _PARSE_LOCK:
        return ast.parse(source)


@lru_cache(maxsize=None)
def imported_modules(module: str) -> frozenset[str]:
    """The ``creditflow`` modules ``module``'s source imports, at top level or inside functions (parsed, not
    imported; once per process, like the source itself). ``from package import name`` counts ``package.name`` when
    that is a module, else ``package``."""
    found = set()
    for node in ast.walk(_parse(module_source(module))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "creditflow"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "creditflow":
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} if _is_package(node.module) else set()
            found |= {name for name in submodules if importlib.util.find_spec(name)} or {node.module}
    return frozenset(found)


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def reached_modules(roots: Iterable[str], stop: Iterable[str] = ()) -> tuple[str, ...]:
    """Every ``creditflow`` module the ``roots`` reach through their imports, transitively, the roots included:
    what a stage's (or a token-reward source's) code digest covers, so a moved file or a new helper is covered
    without a list to keep. Modules in ``stop`` are neither counted nor followed (the code of a source the
    config does not use)."""
    stop = set(stop)
    reached: set[str] = set()
    todo = [module for module in roots if module not in stop]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += [m for m in imported_modules(module) if m not in stop]
    return tuple(sorted(reached))


def table_modules(module: str, table: str) -> dict[str, str]:
    """The module of each function in the dict literal ``table`` of ``module``, read from its source, not imported:
    ``RECIPES = {"curate": curate.compute_curate}`` with ``from creditflow.tasks.recipes import curate`` gives
    ``{"curate": "creditflow.tasks.recipes.curate"}``. So planning can hash the code a table reaches without
    importing torch, while the table itself holds the functions (an editor finds every caller)."""
    tree = _parse(module_source(module))
    names = {}  # local name -> the module it is, or the module it comes from
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "creditflow":
            package = _is_package(node.module)
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                names[alias.asname or alias.name] = full if package and importlib.util.find_spec(full) else node.module
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == table for t in targets) and isinstance(node.value, ast.Dict):
            found = {}
            for key, value in zip(node.value.keys, node.value.values):
                name = value.value.id if isinstance(value, ast.Attribute) else value.id  # module.function, or function
                found[key.value] = names[name]
            return found
    raise LookupError(f"no dict literal {table} in {module}")


def code_version(modules: Iterable[str]) -> str:
    """Package version plus a digest of the source of ``modules`` (dotted names, usually :func:`reached_modules`).

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
    tree = _parse(source)
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
