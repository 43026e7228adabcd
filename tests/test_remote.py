"""The SSH runner against a real OpenSSH server on 127.0.0.1 (tests/sshd.py): install, detached
stages, live progress, copy-back, failures, a dropped connection and re-attaching to a running job."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import pytest
import sshd as sshd_helper

from nanorepro.cloud import jobs, ssh
from nanorepro.cloud.node import NODE_FILE
from nanorepro.cloud.remote import SSHRunner
from nanorepro.errors import UserError

REPO = Path(__file__).resolve().parent.parent
# The node's folder: spaces, a quote and a ';' must survive every remote command.
ODD_DIR = "node home/it's; odd"


@pytest.fixture(scope="module")
def server(loopback_node):
    return loopback_node  # the session's loopback sshd (conftest.py)


class Lines:
    """Collects what the runner prints, with arrival times."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self.hooks: list = []

    def __call__(self, line: str) -> None:
        self.lines.append((time.monotonic(), line))
        for hook in self.hooks:
            hook(line)

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def make_runner(server, base: Path, out=None, **kw) -> SSHRunner:
    return SSHRunner(server.host, key_path=server.key_path, user=server.user, port=server.port,
                     remote_dir=str(base / ODD_DIR), workdir="results/x", state_dir=base / "state",
                     poll_s=0.1, out=out, **kw)


@pytest.fixture(scope="module")
def node(server, tmp_path_factory):
    """A runner whose node has the code installed (once for the module), from a snapshot of the package
    (not a git checkout: the fallback file list), so edits to the working tree cannot change it mid-test."""
    base = tmp_path_factory.mktemp("node")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "nanorepro", src / "nanorepro", ignore=shutil.ignore_patterns("__pycache__"))
    out = Lines()
    runner = make_runner(server, base, out=out, local_root=src)
    runner.setup(install_cmd=sshd_helper.cheap_install())
    yield runner, out, base
    runner.close()


def test_setup_installs_the_copied_code(node):
    runner, out, base = node
    assert "copying the code" in out.text and "node ready" in out.text
    out.lines.clear()
    assert runner.run(["--version"], stage="version") == 0
    assert "nanorepro 0.1.0" in out.text
    # the stage imported the copy on the node, from its own venv
    runner.run_command([runner._python(), "-c", "import nanorepro, sys; print(nanorepro.__file__); print(sys.prefix)"],
                       stage="where")
    assert f"{base / ODD_DIR}/nanorepro/__init__.py" in out.text
    assert f"{base / ODD_DIR}/.venv" in out.text
    assert (base / ODD_DIR / "pyproject.toml").is_file() and (base / ODD_DIR / "results" / "x").is_dir()
    out.lines.clear()
    runner.setup(install_cmd=sshd_helper.cheap_install())  # a re-run with the same code installs nothing
    assert "already has this code installed" in out.text and "[setup]" not in out.text


def test_arguments_with_spaces_quotes_and_semicolons_arrive_intact(node):
    runner, out, base = node
    args = ["a b", "it's", "x;y", "$HOME", "`id`", "\"q\""]
    runner.run_command([sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args],
                       stage="quote 'me'; now")
    assert json.dumps(args) in out.text
    assert not (base / "x").exists()


def test_progress_streams_while_the_stage_runs(node, tmp_path):
    runner, out, _ = node
    out.lines.clear()
    # the job goes on only once its first line has reached this side: lines arrive as they are
    # written, not all at the end (or it says so after 60 s)
    go = tmp_path / "go"
    out.hooks.append(lambda line: go.touch() if line == "step 0" else None)
    code = (f"import os, time\nprint('step 0', flush=True)\nfor _ in range(600):\n"
            f"    if os.path.exists({str(go)!r}): break\n    time.sleep(0.1)\n"
            "else:\n    print('the first line never reached the caller', flush=True)\n"
            "for i in range(1, 6):\n    print('step', i, flush=True)\n"
            "print('bar 1', end='\\r'); print('bar 2', end='\\r'); print('bar 3')\n")
    try:
        runner.run_command([sys.executable, "-c", code], stage="progress")
    finally:
        out.hooks.clear()
    steps = [line for _, line in out.lines if line.startswith("step")]
    assert steps == [f"step {i}" for i in range(6)]
    assert "never reached" not in out.text
    # a progress bar's \r stays in its line, so the notebook overwrites it in place as for local runs
    assert out.lines[-1][1] == "bar 1\rbar 2\rbar 3"


def test_failing_stage_raises_with_the_tail_of_its_log(node):
    runner, out, _ = node
    with pytest.raises(UserError) as e:
        runner.run(["no-such-command"], stage="bogus")
    msg = str(e.value)
    assert "stage bogus failed" in msg and "exit 2" in msg
    assert "invalid choice: 'no-such-command'" in msg  # argparse's last line, from the node's log
    assert ".jobs/bogus-" in msg  # where the whole log is
    assert runner.run(["no-such-command"], stage="bogus", check=False) == 2


def test_fetch_copies_results_but_leaves_checkpoints(node, tmp_path):
    runner, _, _ = node
    code = ("from pathlib import Path\nd = Path('runs/r'); (d / 'sub').mkdir(parents=True, exist_ok=True)\n"
            "(d / 'metrics.jsonl').write_text('{\"kind\": \"end\"}\\n'); (d / 'ckpt.pt').write_bytes(b'x' * 10)\n"
            "(d / 'sub' / 'samples.txt').write_text('To be')\n")
    runner.run_command([sys.executable, "-c", code], stage="write")
    got = runner.fetch("runs/r", tmp_path)
    assert got == tmp_path / "runs" / "r"
    assert (got / "metrics.jsonl").read_text() == '{"kind": "end"}\n'
    assert (got / "sub" / "samples.txt").read_text() == "To be"
    assert not (got / "ckpt.pt").exists()
    assert runner.fetch("runs/r/ckpt.pt", tmp_path).read_bytes() == b"x" * 10  # asked for by name
    with pytest.raises(UserError, match="does not exist on the node"):
        runner.fetch("runs/nope", tmp_path)


def test_put_copies_a_file_to_the_node(node, tmp_path):
    runner, _, base = node
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\n")
    runner.put(src, "inputs/input.txt")
    assert (base / ODD_DIR / "results" / "x" / "inputs" / "input.txt").read_text() == "First Citizen:\n"


def test_dropped_connection_reconnects_and_the_job_keeps_running(node, server, monkeypatch):
    TICKS = 16  # the job outlives three drops and reconnections even on a loaded machine
    runner, out, _ = node
    out.lines.clear()
    dropped, killed, midway = threading.Event(), threading.Event(), threading.Event()
    get_sftp = runner.ssh.sftp

    def sftp_that_dies_in_use():
        sftp = get_sftp()
        if killed.is_set() and not midway.is_set() and any(line == "tick 6" for _, line in out.lines):
            midway.set()
            runner.ssh._client.get_transport().close()  # dies between two reads of one poll
        return sftp

    monkeypatch.setattr(runner.ssh, "sftp", sftp_that_dies_in_use)

    def drop(line: str) -> None:
        if line == "tick 1" and not dropped.is_set():
            dropped.set()
            runner.ssh._client.get_transport().close()  # the hub side gives up on the connection
        if line == "tick 4" and not killed.is_set():
            killed.set()
            for pid in server.session_pids():  # the node side drops it mid-poll (a network blip)
                os.kill(pid, signal.SIGKILL)

    out.hooks.append(drop)
    try:
        code = ("import os, time\nprint('pid', os.getpid(), flush=True)\n"
                "for i in range(TICKS):\n    print('tick', i, flush=True)\n    time.sleep(0.25)\n").replace("TICKS", str(TICKS))
        assert runner.run_command([sys.executable, "-c", code], stage="long") == 0
    finally:
        out.hooks.clear()
    assert dropped.is_set() and killed.is_set() and midway.is_set()
    text = out.text
    assert text.count("connection to 127.0.0.1 lost") >= 3 and "reconnecting" in text
    assert "[long] connection to 127.0.0.1 lost (" in text  # the drop inside a poll, with its cause
    ticks = [line for _, line in out.lines if line.startswith("tick")]
    assert ticks == [f"tick {i}" for i in range(TICKS)]  # every line once, in order: one job, never restarted
    assert sum(line.startswith("pid ") for _, line in out.lines) == 1
    assert "attaching" not in text


def test_rerun_attaches_to_a_job_that_is_still_running(node, server, tmp_path):
    runner, _, base = node
    code = "import time\nfor i in range(5):\n    print('beat', i, flush=True)\n    time.sleep(0.3)\n"
    argv = [sys.executable, "-c", code]
    cmd = " ".join(shlex.quote(a) for a in argv)
    # the kernel that started the job died: start it the way run_command does, then walk away
    job = PurePosixPath(jobs.JOBS) / f"heart-{hashlib.sha1(cmd.encode()).hexdigest()[:8]}"
    assert runner.jobs.launch(cmd, job, runner.stage_dir) == "started"
    out = Lines()
    fresh = make_runner(server, base, out=out)
    try:
        assert fresh.run_command(argv, stage="heart") == 0
    finally:
        fresh.close()
    assert "already running" in out.text and "attaching" in out.text
    assert [line for _, line in out.lines if line.startswith("beat")] == [f"beat {i}" for i in range(5)]


def test_a_killed_job_is_reported(node):
    runner, _, _ = node
    code = "import os, time\nprint('working', flush=True)\nos.kill(os.getppid(), 9); os.kill(os.getpid(), 9)\n"
    with pytest.raises(UserError, match="stopped without an exit code"):
        runner.run_command([sys.executable, "-c", code], stage="doomed")


def test_from_state_reads_the_node_record_and_never_copies_the_key(node, server, tmp_path):
    runner, _, base = node
    state = tmp_path / "results"
    state.mkdir()
    record = {"host": server.host, "port": server.port, "user": server.user, "key_path": str(server.key_path),
              "remote_dir": str(base / ODD_DIR), "site": "CHI@UC", "lease_id": "l-1", "server_id": "s-1"}
    (state / NODE_FILE).write_text(json.dumps(record))
    out = Lines()
    r = SSHRunner.from_state(state, workdir=Path("results/x"), out=out, poll_s=0.1)
    try:
        assert r.run(["--version"], stage="version") == 0
        r.fetch(".", tmp_path / "copy")
    finally:
        r.close()
    assert "nanorepro 0.1.0" in out.text
    assert (state / ssh.KNOWN_HOSTS).is_file()  # the node's host key is pinned for later connections
    key = server.key_path.read_text().strip().splitlines()[1]
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert key not in path.read_text(errors="replace"), path


def test_missing_record_key_and_unreachable_node_are_user_errors(server, tmp_path):
    with pytest.raises(UserError, match="run 00_reserve_node"):
        SSHRunner.from_state(tmp_path)
    (tmp_path / NODE_FILE).write_text(json.dumps({"host": "127.0.0.1", "key_path": str(tmp_path / "nokey")}))
    with pytest.raises(UserError, match="does not exist"):
        SSHRunner.from_state(tmp_path).run(["--version"], stage="v")
    closed_port = sshd_helper._free_port()
    r = SSHRunner("127.0.0.1", key_path=server.key_path, user=server.user, port=closed_port, connect_timeout_s=2)
    with pytest.raises(UserError, match="cannot reach .* over SSH"):
        r.run(["--version"], stage="v")


def test_a_changed_host_key_is_refused(server, tmp_path):
    import paramiko

    state = tmp_path / "state"
    state.mkdir()
    other = paramiko.Ed25519Key.from_private_key_file(str(server.key_path))  # any key but the host's
    (state / ssh.KNOWN_HOSTS).write_text(f"[127.0.0.1]:{server.port} {other.get_name()} {other.get_base64()}\n")
    r = SSHRunner(server.host, key_path=server.key_path, user=server.user, port=server.port, state_dir=state)
    with pytest.raises(UserError, match="host key of 127.0.0.1 changed"):
        r.ssh.check("true", "test")
