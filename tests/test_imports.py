"""Dependencies inside the package run one way: no module imports one that (directly or not) imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "nanorepro"


def own_imports(path: Path) -> set[str]:
    """The package's modules that `path` imports anywhere: at the top, inside functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from . import x / from .x import y
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanorepro."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nanorepro.")}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {m for m in found if m in modules and m != path.stem}


def graph() -> dict[str, set[str]]:
    return {p.stem: own_imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that can reach itself (depth-first search)."""
    found = []
    for start in sorted(edges):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt == start:
                    found.append(path + [start])
                    stack.clear()
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_import_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                          ["c", "a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_seen(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from .report import x\n    from . import plots\n")
    assert {"report", "plots"} <= own_imports(mod)


def test_the_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_the_hub_side_depends_one_way():
    edges = graph()
    assert "pipeline" not in edges["runner"] | edges["remote"]  # notebook -> pipeline -> runner -> ssh
    assert "report" not in edges["plots"]  # report -> plots, never back
