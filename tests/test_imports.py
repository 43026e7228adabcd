"""The folders show the architecture, and imports respect it: arrows point down and inward, never back up.

    entry     cli, pipeline, notebooks, compare        may import anything below
    folders   gpt/ (the only torch), data/, cloud/, results/   import the contracts; gpt/ also reads data/
    contracts config, metrics, envinfo, envlock, memory, errors, files, fmt, faults   import only each other

and no module imports one that (directly or not) imports it back.
"""

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "nanorepro"
ENTRY = {"cli", "pipeline", "notebooks", "compare", "__main__"}
FOLDERS = {"gpt": {"data"}, "data": set(), "cloud": set(), "results": set()}  # folder -> folders it may import


def module_name(path: Path) -> str:
    """'gpt.train' for nanorepro/gpt/train.py; a package's __init__ is named for the package ('gpt')."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "bundled" not in p.parts}


def own_imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere: at the top, inside functions, under TYPE_CHECKING."""
    here = "nanorepro." + module_name(path)
    package = here if path.stem == "__init__" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module or ""
            for alias in node.names:  # `from nanorepro.gpt import train` names a module; `from x import f` a name
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}".removeprefix("nanorepro.") in known
                          else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    inside = {m.removeprefix("nanorepro.") for m in found if m.startswith("nanorepro.")}
    return {m for m in inside if m in known and m != module_name(path) and m not in FOLDERS}


def graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: own_imports(p, known) for name, p in modules().items() if name != "__init__"
            and name not in FOLDERS}


def layer(module: str) -> str:
    if "." in module:
        return module.split(".")[0]
    return "entry" if module in ENTRY else "contracts"


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


def backward(edges: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the layering in the module docstring."""
    bad = []
    for mod, targets in edges.items():
        src = layer(mod)
        for t in targets:
            dst = layer(t)
            allowed = (src == "entry" or dst == "contracts" or dst == src
                       or (src in FOLDERS and dst in FOLDERS[src]))
            if not allowed:
                bad.append(f"{mod} -> {t}")
    return sorted(bad)


def test_the_import_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                          ["c", "a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_layering_check_finds_an_import_back_up():
    assert backward({"config": {"gpt.train"}, "gpt.train": {"cloud.remote", "data.dataset", "config"},
                     "cloud.remote": {"pipeline"}, "cli": {"gpt.train"}}) == \
        ["cloud.remote -> pipeline", "config -> gpt.train", "gpt.train -> cloud.remote"]


def test_imports_are_seen_in_every_form(tmp_path):
    """Function-level, relative, absolute, `from package import module` and `import a.b` are all found."""
    pkg = tmp_path / "nanorepro"
    (pkg / "gpt").mkdir(parents=True)
    mod = pkg / "gpt" / "m.py"
    mod.write_text("def f():\n    from ..results.report import x\n    from nanorepro.results import plots\n"
                   "import nanorepro.cloud.remote\nfrom . import train\nfrom nanorepro import config\n")
    known = {"results.report", "results.plots", "cloud.remote", "gpt.train", "config", "gpt.m"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert own_imports(mod, known) == {"results.report", "results.plots", "cloud.remote", "gpt.train", "config"}
    finally:
        PACKAGE = saved


def test_the_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_imports_run_down_and_inward():
    edges = graph()
    assert "gpt.train" in edges and "cloud.remote" in edges  # the walk found the folders
    assert backward(edges) == []


def test_every_module_sits_in_a_layer():
    """A new top-level module must be placed on purpose: an entry point or a contract."""
    contracts = {m for m in graph() if layer(m) == "contracts"}
    assert contracts == {"config", "metrics", "envinfo", "envlock", "memory", "errors", "files", "fmt", "faults"}


TORCH_FREE = sorted(m for m in modules() if not m.startswith("gpt") and m != "__main__")


_CHECK = """
import sys, importlib, json
HEAVY = ('torch', 'transformers', 'tiktoken', 'datasets')
for name in json.loads(sys.argv[1]):
    for m in [m for m in sys.modules if m == 'nanorepro' or m.startswith('nanorepro.')]:
        del sys.modules[m]
    importlib.import_module(name)
    heavy = sorted(m for m in HEAVY if m in sys.modules)
    print(json.dumps([name, heavy]), flush=True)
    if heavy:
        break
"""


def heavy_imports(modules: list[str]) -> dict[str, list[str]]:
    """The heavy libraries each of `modules` (torch-free names) imports when imported on its own.

    A process per module costs ~1.4 s each, so one process imports them in turn, dropping the package from
    sys.modules before each, so every module is imported afresh with its own dependencies. A heavy library,
    once loaded, cannot be dropped: after a module brings one in, a new process goes on with the rest."""
    names = {("nanorepro" if m == "__init__" else f"nanorepro.{m}"): m for m in modules}
    found: dict[str, list[str]] = {}
    while len(found) < len(names):
        rest = [n for n in names if names[n] not in found]
        r = subprocess.run([sys.executable, "-c", _CHECK, json.dumps(rest)], cwd=PACKAGE.parent,
                           capture_output=True, text=True, timeout=120)
        done = [json.loads(line) for line in r.stdout.splitlines()]
        assert done, f"importing {rest[0]} failed: {r.stderr[-2000:]}"
        found.update({names[n]: heavy for n, heavy in done})
    return found


@pytest.fixture(scope="module")
def heavy():
    return heavy_imports(TORCH_FREE)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_only_gpt_imports_torch(module, heavy):
    """Everything outside gpt/ is what the Chameleon hub kernel (1 GB, no GPU) may import: no torch, nor the
    heavy libraries beside it, even when imported on its own."""
    assert heavy[module] == [], f"{module} imports {heavy[module]}"


def test_the_torch_check_names_each_module_that_imports_torch(tmp_path):
    """The check above, shown finding every offender, also after one has loaded torch in its process."""
    pkg = tmp_path / "nanorepro"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "light.py").write_text("import json\n")
    (pkg / "heavy.py").write_text("from nanorepro import light\nimport torch\n")
    (pkg / "after.py").write_text("from nanorepro import heavy\n")
    (tmp_path / "torch.py").write_text("")  # found first (the check runs in PACKAGE.parent): no real torch to load
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert heavy_imports(["__init__", "light", "heavy", "light", "after"]) == {
            "__init__": [], "light": [], "heavy": ["torch"], "after": ["torch"]}
    finally:
        PACKAGE = saved


def test_no_lazy_torch_in_torch_free_modules():
    """No torch import hidden in a function outside gpt/: a torch-free module is torch-free all through."""
    offenders = []
    for name in TORCH_FREE:
        for node in ast.walk(ast.parse(modules()[name].read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []


MAX_CLASS_LINES, MAX_FUNCTION_LINES = 250, 100


def too_long(path: Path) -> list[str]:
    """Classes over MAX_CLASS_LINES and functions over MAX_FUNCTION_LINES in `path` (decorators included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else \
            MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if limit is not None:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - first + 1 > limit:
                found.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - first + 1} lines)")
    return found


def test_the_length_check_finds_a_long_function(tmp_path):
    long = tmp_path / "m.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n\ndef g():\n    pass\n")
    assert too_long(long) == [f"m.py:1 f ({MAX_FUNCTION_LINES + 1} lines)"]


def test_no_class_or_function_too_long_to_read_in_one_sitting():
    assert [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in too_long(p)] == []
