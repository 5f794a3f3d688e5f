"""The house rules, read from the source: which layer may import which, no import cycles, no stray tasks module."""

from pathlib import Path

from creditflow.storage.hashing import imported_modules

ROOT = Path(__file__).parents[1]
LAYERS = ("flows", "tasks", "storage")


def _modules() -> list[str]:
    found = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.append(".".join(("creditflow", *parts)).removesuffix(".__init__"))
    return found


def _graph() -> dict[str, set[str]]:
    return {module: {m for m in imported_modules(module) if m.count(".") >= 2} for module in _modules()}


def test_storage_knows_no_models_and_tasks_know_no_flows():
    for module, imports in _graph().items():
        layer = module.split(".")[1]
        below = {"storage": ("creditflow.tasks", "creditflow.flows"), "tasks": ("creditflow.flows",)}.get(layer, ())
        assert not [m for m in imports if m.startswith(below)], module


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for child in sorted(graph.get(module, ())):
            if child not in graph:
                continue  # a package's __init__ (always empty here)
            assert state.get(child) != "open", " -> ".join([*path, module, child])
            if child not in state:
                visit(child, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_every_tasks_module_sits_in_a_role_folder():
    shared = {"configs", "config_base", "stage", "plots", "__init__"}  # what every role folder uses
    stray = [p.name for p in (ROOT / "tasks").glob("*.py") if p.stem not in shared]
    assert not stray
    roles = {p.name for p in (ROOT / "tasks").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert roles == {"recipes", "train", "credit", "losses", "models", "data", "infer"}
