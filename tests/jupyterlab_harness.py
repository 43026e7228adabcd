"""A throwaway JupyterLab server and a headless Chromium to drive it, for "Run All" tests.

`jupyter_lab(root_dir)` starts `jupyter lab` from the interpreter running the tests (the project's
.venv under `.venv/bin/pytest`) on 127.0.0.1 with a random port and token. Every Jupyter config,
data, runtime, settings and workspace folder is a fresh temp dir, so nothing from ~/.jupyter
leaks in and nothing is written back; autosave, news and update checks are off, and notebooks
render every cell (no windowing) so their outputs can be read from the page.

`chromium(...)` launches Debian's /usr/bin/chromium through playwright (never `playwright
install`), confined to loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")

# Flags that work for Debian's chromium in a container; MAP * rules keep the page on loopback.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

# User settings written before start-up: <plugin id>.jupyterlab-settings under JUPYTERLAB_SETTINGS_DIR.
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    # autosave would write outputs back into the .ipynb after ~2 minutes
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    # a news toast can cover the page, and both checks would reach the internet
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    # windowing leaves off-screen cells out of the DOM; tests read every output from the page
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
}

_JUPYTER_DIRS = ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR",
                 "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR")


@dataclass
class LabServer:
    """A running server: where it listens, its token and its files."""

    port: int
    token: str
    root_dir: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lab_url(self, notebook: str) -> str:
        """URL that opens `notebook` (relative to root_dir) in a fresh workspace."""
        return f"{self.base_url}/lab/tree/{notebook}?token={self.token}&reset"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0) -> Any:
        """Call the REST API; returns the decoded JSON body (None when empty)."""
        req = urllib.request.Request(f"{self.base_url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-n:])


def free_port() -> int:
    """A port nobody listens on right now (the server refuses to fall back to another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        path = settings_dir / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")


@contextlib.contextmanager
def jupyter_lab(root_dir: Path, *, env: dict[str, str] | None = None,
                bin_dir: Path | None = None, startup_timeout: float = 60.0) -> Iterator[LabServer]:
    """Run `jupyter lab` serving `root_dir` until the block exits; kernels inherit `env`.

    `bin_dir` (default: the folder of the running interpreter, i.e. the venv's bin) goes first
    on PATH, so the `python3` kernelspec runs the same Python with the same packages.
    """
    bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
    python = bin_dir / "python"
    if not python.exists():
        python = Path(sys.executable)
    port, token = free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="nanorepro-lab-") as tmp:
        tmp_path = Path(tmp)
        run_env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("JUPYTER", "JPY_")) and k != "IPYTHONDIR"}
        for name in _JUPYTER_DIRS:
            d = tmp_path / name.lower()
            d.mkdir()
            run_env[name] = str(d)
        _write_settings(Path(run_env["JUPYTERLAB_SETTINGS_DIR"]))
        run_env["PATH"] = f"{bin_dir}{os.pathsep}{run_env.get('PATH', '')}"
        run_env["PYTHONUNBUFFERED"] = "1"
        run_env.update(env or {})
        cmd = [
            str(python), "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
            "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
            "--LabApp.extension_manager=readonly",
        ]
        log_path = tmp_path / "jupyter.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=root_dir, env=run_env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = LabServer(port, token, Path(root_dir), log_path, proc)
        try:
            _wait_ready(server, startup_timeout)
            yield server
        finally:
            _stop(server)


def _wait_ready(server: LabServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            server.api("/api/status", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise TimeoutError(f"jupyter lab not ready after {timeout:.0f} s:\n{server.log_tail()}")


def _stop(server: LabServer) -> None:
    """Shut kernels down through the API, then the server; kill only what is left of ours."""
    proc = server.process
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            for kernel in server.api("/api/kernels") or []:
                server.api(f"/api/kernels/{kernel['id']}", method="DELETE", timeout=10)
        with contextlib.suppress(Exception):
            server.api("/api/shutdown", method="POST")
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def chromium(timeout_ms: float = 60_000) -> Iterator[Any]:
    """A playwright Page in headless Debian Chromium (playwright gives it a fresh profile)."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: run scripts/system-deps.sh as root")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


# Done when every non-empty code cell has an execution count and the kernel is idle, or as soon
# as one cell shows an error (Run All stops there, so the rest would never get a count).
_RUN_STATE_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!w || !w.content || !w.sessionContext) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  for (const [i, c] of cells.entries()) {
    const err = c.model.outputs.toJSON().find(o => o.output_type === 'error');
    if (err) return {done: true, error: `code cell ${i + 1}: ${err.ename}: ${err.evalue}`};
  }
  const pending = cells.filter(c => c.model.sharedModel.getSource().trim() && c.model.executionCount === null);
  return (pending.length === 0 && kernel && kernel.status === 'idle') ? {done: true, error: null} : null;
}"""

_KERNEL_IDLE_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return Boolean(w && w.context && w.context.isReady && kernel && kernel.status === 'idle');
}"""


def start_run_all(page: Any, server: LabServer, notebook: str, timeout_s: float = 60.0) -> None:
    """Open `notebook` and fire Run All as a user would, without waiting for the cells."""
    page.goto(server.lab_url(notebook))
    page.wait_for_function(_KERNEL_IDLE_JS, timeout=timeout_s * 1000)
    # fired, not awaited: a command that opens a dialog never resolves, and evaluate has no timeout
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def run_all_cells(page: Any, server: LabServer, notebook: str, timeout_s: float = 60.0) -> str:
    """Open `notebook`, fire Run All as a user would, wait for it to finish; return the page text.

    Raises AssertionError naming the first cell that failed.
    """
    start_run_all(page, server, notebook, timeout_s)
    return wait_run_all(page, notebook, timeout_s)


def wait_run_all(page: Any, notebook: str, timeout_s: float = 60.0) -> str:
    """Wait for the Run All fired by start_run_all to finish; the page text (AssertionError on a failed cell)."""
    state = page.wait_for_function(_RUN_STATE_JS, timeout=timeout_s * 1000, polling=250).json_value()
    text = page.locator(".jp-NotebookPanel .jp-Notebook").inner_text()
    if state["error"]:
        raise AssertionError(f"Run All failed in {notebook}: {state['error']}\n--- page ---\n{text[-3000:]}")
    return text


def save_notebook(page: Any, path: Path, timeout_s: float = 30.0) -> dict[str, Any]:
    """Save the open notebook as a user would (the saved file is the executed copy); its JSON."""
    before = path.stat().st_mtime_ns
    page.evaluate("() => { window.jupyterapp.commands.execute('docmanager:save'); }")
    deadline = time.monotonic() + timeout_s
    while path.stat().st_mtime_ns == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} was not saved within {timeout_s:.0f} s")
        time.sleep(0.2)
    time.sleep(0.5)  # the write may still be under way
    return json.loads(path.read_text(encoding="utf-8"))


def show_first(page: Any, selector: str, path: Path) -> Path:
    """Scroll the first element matching `selector` to the top of the notebook and screenshot the page."""
    page.locator(selector).first.evaluate("el => el.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)  # let images decode and the layout settle
    page.screenshot(path=str(path))
    return path
