"""The shape of the package: no import cycle, and the deployed code never reaches the stand-ins.

The graph is read from the source (every ``import`` statement, ``TYPE_CHECKING`` ones included),
so a cycle hidden behind a type-only import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "upgrade_handler"
#: The one module of the package that may start the stand-ins: the local demo.
DEMO = "upgrade_handler.cli.demo"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The modules ``path`` imports, resolved to absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imports_of(path) if target in modules} for name, path in modules.items()}


def test_the_package_has_no_import_cycle() -> None:
    edges = graph()
    # A package's __init__ re-exports its modules; the arrows that matter are between modules.
    edges = {name: {t for t in targets if t != "upgrade_handler"} for name, targets in edges.items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges.get(name, ())):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target] if target in path else [name, target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_only_the_demo_imports_the_stand_ins() -> None:
    reaching = sorted(
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if any(target == "standins" or target.startswith("standins.") for target in imports_of(path))
    )
    assert reaching == [DEMO]
    assert not (PACKAGE / "devtools").exists()


def test_the_fan_out_does_not_need_the_handler() -> None:
    assert not any(target.startswith("upgrade_handler.handler") for target in imports_of(PACKAGE / "fanout.py"))
