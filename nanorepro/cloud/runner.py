"""Where a stage runs: here (`local`) or on a reserved Chameleon node over SSH (`chameleon`).

A stage is a `nanorepro <command>` line run in the target's work folder, so a stage behaves the same
wherever it runs; notebooks only pick the target. No torch here: the hub kernel imports this.
"""

from __future__ import annotations

import collections
import io
import os
import subprocess
import sys
from pathlib import Path

from nanorepro.cloud.remote import SSHRunner
from nanorepro.errors import UserError
from nanorepro.files import project_root

TARGETS = ("auto", "local", "chameleon")
# Set by Chameleon's JupyterHub in every user server: any JupyterHub, OpenStack credentials, and the
# keypair the hub made for the user (its spawner sets OS_KEYPAIR_PRIVATE_KEY).
HUB_VARIABLES = ("JUPYTERHUB_API_URL", "OS_AUTH_URL", "OS_KEYPAIR_PRIVATE_KEY")


def on_chameleon_hub() -> bool:
    """True inside a server of Chameleon's JupyterHub (the environment it sets), False elsewhere."""
    return all(os.environ.get(v) for v in HUB_VARIABLES)


def resolve_target(target: str) -> str:
    """'auto': 'chameleon' on Chameleon's JupyterHub, 'local' elsewhere; 'local' and 'chameleon' as given."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}", f"use one of: {', '.join(TARGETS)}")
    return ("chameleon" if on_chameleon_hub() else "local") if target == "auto" else target


def results_path(results_dir: str | Path | None, target: str) -> Path:
    """The results folder: `results_dir` (relative to the checkout), or results/<target> when None."""
    return project_root() / (results_dir if results_dir else f"results/{resolve_target(target)}")


class LocalRunner:
    """Runs stages as child processes of this kernel, in `workdir`: one process each (a parallel
    train stage refuses to start outside torchrun and says how to launch it). SSHRunner has the same
    run/fetch/put for a Chameleon node."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)

    def run(self, args: list[str], *, stage: str, check: bool = True, parallel: str = "none",
            every_node: bool = False) -> int:
        """Run `python -m nanorepro <args>` in the work folder, streaming its output live; its exit code.
        (`every_node` is SSHRunner's: here there is one machine.)"""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "nanorepro", *args]
        tail: collections.deque[str] = collections.deque(maxlen=20)
        # the child runs this very package, installed or not (the hub imports it through notebooks/nanorepro)
        package_parent = str(Path(__file__).resolve().parents[2])
        pythonpath = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}
        with subprocess.Popen(cmd, cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=env) as proc:
            # newline="": split at \n and at a progress bar's \r but keep both, so Jupyter and terminals
            # redraw the bar in place (text=True would turn every \r into a new line)
            overwrite = False
            for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline=""):
                sys.stdout.write(line)
                sys.stdout.flush()
                text = line.rstrip("\r\n")
                if overwrite and tail:
                    tail[-1] = text  # the bar's latest state replaces its previous one
                elif text:
                    tail.append(text)
                overwrite = line.endswith("\r") and bool(text)
            code = proc.wait()
        if code and check:
            raise UserError(f"stage {stage} failed (exit {code}); its last lines:\n" + "\n".join(tail),
                            "fix the cause above and re-run: finished work is kept and training resumes")
        return code

    def fetch(self, rel_path: str, local_dir: Path) -> Path:
        """The local path of a stage's output: already in the work folder, which is the results folder."""
        return self.workdir / rel_path

    def put(self, local_path: Path, rel_path: str) -> str:
        """The path a stage command should use for a local file: its own (no copy needed)."""
        return str(Path(local_path).resolve())


def get_runner(target: str, workdir: Path) -> LocalRunner | SSHRunner:
    """The runner for `target`; for 'chameleon', `workdir` holds the node record that `00_reserve_node` wrote."""
    if resolve_target(target) == "local":
        return LocalRunner(workdir)
    return SSHRunner.from_state(Path(workdir), workdir=workdir)
