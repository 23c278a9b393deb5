"""The import direction of the packages: Kasmina, Tamiyo, Oona, Leyline and the neutral contracts
never import the orchestrator (not even for type checking), so each can be used and tested alone."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "esper"
INDEPENDENT = ("kasmina", "tamiyo", "oona", "leyline", "contracts.py")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(name: str) -> list[Path]:
    target = SRC / name
    return [target] if target.is_file() else sorted(target.rglob("*.py"))


def test_the_scan_sees_imports_in_every_position(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import a.b\nfrom c import d\nif X:\n    from e.f import g\ndef h():\n    import i\n")
    assert imported_modules(sample) == {"a.b", "c", "e.f", "i"}


def test_kasmina_tamiyo_oona_leyline_and_the_contracts_never_import_tolaria() -> None:
    offenders = [f"{path.relative_to(SRC)} imports {module}"
                 for name in INDEPENDENT for path in _files(name)
                 for module in sorted(imported_modules(path))
                 if module == "esper.tolaria" or module.startswith("esper.tolaria.")]
    assert offenders == []


# ---------------------------------------------------------------- the whole graph


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def edges(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """module -> the esper modules it imports; `from pkg import sub` counts `pkg.sub` when that is a
    module, else `pkg` (so re-exports through a package's __init__ count too)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        out: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                out.update(subs or {node.module})
                if len(subs) < len(node.names):
                    out.add(node.module)
        graph[name] = out - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def later():\n    from c import x\n")
    (tmp_path / "c.py").write_text("if TYPE_CHECKING:\n    from a import y\n")
    (tmp_path / "d.py").write_text("import a\n")
    modules = {p.stem: p for p in tmp_path.glob("*.py")}
    assert cycles(edges(modules)) == [["a", "b", "c"]]


@functools.cache
def esper_graph() -> dict[str, set[str]]:
    return edges()


def test_esper_has_no_import_cycle() -> None:
    assert cycles(esper_graph()) == []


def test_only_the_loop_imports_the_trainer() -> None:
    """The trainer is the loop; components get narrow dependencies. The bench builds one as a user
    would (its figure modules), since a trainer is what it times."""
    allowed = ("esper.tolaria.loop", "esper.tolaria.bench.figures_")
    graph = esper_graph()
    offenders = [f"{name} imports the trainer" for name, path in MODULES.items()
                 if not name.startswith(allowed)
                 and ("esper.tolaria.loop.trainer" in graph[name] or "TolariaTrainer" in imported_names(path))]
    assert offenders == []


def imported_names(path: Path) -> set[str]:
    """The names `from X import name` brings in, anywhere in `path`."""
    return {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
            for a in node.names}


# What each Tolaria package may import of the others (the package docstrings say why).
LEAVES = {"config", "distributed", "data", "models", "run_dir", "imports", "zoo"}
ALLOWED = {
    "state": set(),
    "control": set(),
    "tasks": set(),  # torch only: the loop, the evaluation and the bench build on it
    "checkpoint": {"state"},
    "observe": {"state", "checkpoint", "config"},
    "recovery": {"state", "checkpoint", "control", "observe", *LEAVES},
    "drills": {"state", "checkpoint", "control", "observe", "recovery", *LEAVES},
    "config": {"control"},  # validates the aggregation section with its own model
    "data": {"config"},
}


def _tolaria_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["esper", "tolaria"] else None


def test_tolaria_packages_import_only_downwards() -> None:
    offenders = []
    assert set(ALLOWED) | {"loop", "bench", "cli", "job", "study", "__main__", "drills"} >= {
        _tolaria_part(m) for m in MODULES if _tolaria_part(m)} - LEAVES, "a new package needs its rule here"
    for name, targets in esper_graph().items():
        part = _tolaria_part(name)
        if part not in ALLOWED:
            continue  # loop, bench, cli, job, study: the top, which may use everything
        for target in targets:
            other = _tolaria_part(target)
            if other is not None and other != part and other not in ALLOWED[part]:
                offenders.append(f"{name} imports {target}")
    assert offenders == []


def test_no_drill_name_appears_outside_the_drills_module_and_the_cli() -> None:
    from esper.tolaria.drills import DRILLS

    tolaria = SRC / "tolaria"
    allowed = {tolaria / "drills.py", tolaria / "cli.py"}
    offenders = [f"{path.relative_to(SRC)}: {kind}" for path in sorted(SRC.rglob("*.py")) if path not in allowed
                 for kind in DRILLS if kind in path.read_text()]
    assert offenders == []
