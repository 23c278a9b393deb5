"""The import direction of the packages: Kasmina, Tamiyo, Oona, Leyline and the neutral contracts
never import the orchestrator (not even for type checking), so each can be used and tested alone."""

from __future__ import annotations

import ast
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
