"""The suite's two tiers, and the guard that keeps them honest (conftest.py imports the hooks below).

`slow`: a test that starts sshd (a loopback node), a browser, a Jupyter kernel or server (papermill, the
notebooks) or torchrun, or that trains more than FEW_STEPS optimizer steps in one run. The others are the
fast tier, which `make check` runs (`-m 'not slow and not gpu'`); `make test` runs both. Also slow, by
measurement: a test that takes 2 s or more on 2 cores (`pytest --durations`), mostly because it runs
nanorepro in processes of its own (a process importing torch spends ~2.5 s of CPU before it does anything),
builds a wheel or runs an inner pytest; each is marked with its figure, so that the fast tier stays under
2 minutes on 2 cores. A test is marked with @pytest.mark.slow (or its module's `pytestmark`); one that uses
a fixture in SLOW_FIXTURES (its own or through another fixture) is marked when collected.

The guard: while a test that is not marked slow is set up, run and torn down, every process started from
this process is looked at (`slow_reason`) and every optimizer step counted; a slow thing fails the test
(an error at its teardown), saying what it did and to mark it slow. A fixture whose setup did one is
remembered, so a later unmarked test that uses it fails too, also when a slow test set the fixture up.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator, Sequence

import pytest

FEW_STEPS = 50  # the most optimizer steps one training run (one optimizer) of a fast test may take

# fixtures (module.name) that start one of the slow things, and what they start
SLOW_FIXTURES = {
    "conftest.loopback_node": "starts sshd (the loopback node)",
    "test_multinode.nodes": "starts sshd (two nodes)",
    "test_distributed.runs": "starts torchrun",
}

_JUPYTER = ("ipykernel", "ipykernel_launcher", "papermill", "jupyter", "jupyterlab", "jupyter_server", "nbclient")


def slow_reason(argv: Sequence[str]) -> str | None:
    """Why starting `argv` puts a test in the slow tier, or None."""
    args = [os.fsdecode(a) for a in argv]
    if not args:
        return None
    exe = os.path.basename(args[0])
    module = args[args.index("-m") + 1] if "-m" in args[:-1] else ""
    if exe == "sshd":
        return "starts sshd"
    if "playwright" in args[0] or exe.startswith(("chrome", "chromium", "headless_shell")):
        return "starts a browser"
    if exe.startswith(("jupyter", "papermill")) or module.split(".")[0] in _JUPYTER:
        return "starts a Jupyter kernel or server"
    if (module == "nanorepro" or exe == "nanorepro") and "run-notebooks" in args:
        return "runs the notebooks (papermill)"
    if exe == "torchrun" or module == "torch.distributed.run":
        return "starts torchrun"
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name.lstrip("-") == "max_iters":
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value.isdigit() and int(value) > FEW_STEPS:
                return f"trains {value} steps in a subprocess (more than {FEW_STEPS})"
    return None


def fixture_name(fixturedef) -> str:
    """A fixture as SLOW_FIXTURES names it: the module defining it, and its name."""
    return f"{getattr(fixturedef.func, '__module__', '?')}.{fixturedef.argname}"


def fixtures_of(item: pytest.Item) -> set[str]:
    """The fixtures `item` uses (directly or through others), as fixture_name names them."""
    info = getattr(item, "_fixtureinfo", None)
    return {fixture_name(defs[-1]) for defs in (info.name2fixturedefs.values() if info else ()) if defs}


class Guard:
    """What the unmarked test now running (`item`) did that belongs to the slow tier."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.found: list[str] = []
        self.fixtures: list[str] = []  # the fixtures being set up now, innermost last (fixture_name)
        self.slow_fixtures: dict[str, str] = {}  # a fixture whose setup did a slow thing -> what
        self.steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> steps taken

    def start(self, item: pytest.Item) -> None:
        self.item = None if item.get_closest_marker("slow") else item
        self.found, self.steps = [], weakref.WeakKeyDictionary()

    def saw(self, reason: str) -> None:
        for name in self.fixtures:  # the innermost did it; any around it asked for it (getfixturevalue)
            self.slow_fixtures.setdefault(name, reason)
        if self.item is not None:
            what = reason + (f" (fixture {self.fixtures[-1]!r})" if self.fixtures else "")
            if what not in self.found:
                self.found.append(what)

    def step(self, optimizer, args, kwargs) -> None:
        self.steps[optimizer] = n = self.steps.get(optimizer, 0) + 1
        if n == FEW_STEPS + 1:
            self.saw(f"trains more than {FEW_STEPS} steps")

    def verdict(self, item: pytest.Item) -> str | None:
        """Why the unmarked test `item` belongs to the slow tier, or None."""
        if self.item is not item:
            return None
        found, used = list(self.found), fixtures_of(item)
        for name, why in self.slow_fixtures.items():
            if name in used and not any(f"fixture {name!r}" in f for f in found):
                found.append(f"uses fixture {name!r}, which {why}")
        if not found:
            return None
        return (f"{item.nodeid} is in the fast tier, but {'; '.join(found)}: mark it @pytest.mark.slow "
                "(tests/tiers.py says what is slow)")


GUARD = Guard()


class _CountSteps(importlib.abc.MetaPathFinder):
    """Once torch.optim.optimizer is imported (if it ever is), every optimizer step is counted by GUARD."""

    def find_spec(self, name, path, target=None):
        if name != "torch.optim.optimizer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_count(module):
                exec_module(module)
                module.register_optimizer_step_post_hook(GUARD.step)
            spec.loader.exec_module = exec_and_count
        return spec


def install() -> None:
    """Watch every process started from this process, and every optimizer step (once per process)."""
    execute_child = subprocess.Popen._execute_child
    if getattr(execute_child, "watched_by_tiers", False):
        return

    def watched(self, args, *rest, **kwargs):
        reason = slow_reason(args.split() if isinstance(args, (str, bytes)) else list(args))
        if reason:
            GUARD.saw(reason)
        return execute_child(self, args, *rest, **kwargs)

    watched.watched_by_tiers = True
    subprocess.Popen._execute_child = watched
    if "torch.optim.optimizer" in sys.modules:
        sys.modules["torch.optim.optimizer"].register_optimizer_step_post_hook(GUARD.step)
    else:
        sys.meta_path.insert(0, _CountSteps())


# -- hooks (imported into conftest.py) ---------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    install()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.get_closest_marker("slow") and fixtures_of(item) & SLOW_FIXTURES.keys():
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    GUARD.fixtures.append(fixture_name(fixturedef))
    try:
        return (yield)
    finally:
        GUARD.fixtures.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem) -> Iterator[None]:
    GUARD.start(item)
    try:
        return (yield)
    finally:
        GUARD.item = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem) -> Iterator[None]:
    result = yield
    problem = GUARD.verdict(item)
    if problem:
        pytest.fail(problem, pytrace=False)
    return result
