"""Security: no pickle in the package, checkpoints read with weights_only=True (a booby-trapped one is
refused without running its payload), remote commands that no name can inject into, secrets in the
environment that never reach a notebook, log or result, and an SSH private key that is read in place,
only when no one else can read it.

Covered elsewhere, not repeated: arguments and folders with spaces, quotes, `;`, `$HOME` and backticks
arriving intact on the node (test_remote.py::test_arguments_with_spaces_quotes_and_semicolons_arrive_intact,
whose node folder is "node home/it's; odd"); fetched results and the node record never holding the
key (test_remote.py::test_from_state_reads_the_node_record_and_never_copies_the_key,
test_chameleon.py::test_reserve_twice_then_release_through_the_notebooks).
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import sshd as sshd_helper
import torch

from nanorepro.cloud import remote, ssh
from nanorepro.errors import UserError
from nanorepro.gpt.checkpoint import load as load_checkpoint

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "nanorepro"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# -- no pickle ---------------------------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_the_package_never_unpickles():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 15
    problems, torch_loads = [], 0
    for path in sources:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                             if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where}:{node.lineno} imports from {node.module}")
        for call, owner, name in _calls(tree):
            at = f"{where}:{call.lineno}"
            if name == "load" and owner in ("torch", "serialization"):
                torch_loads += 1
                wo = _kw(call, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{at} torch.load without weights_only=True")
            if name in ("load", "loads", "Unpickler") and owner in UNSAFE_MODULES:
                problems.append(f"{at} {owner}.{name}")
            if name in ("read_pickle", "to_pickle"):
                problems.append(f"{at} {name}")
            if (allow := _kw(call, "allow_pickle")) is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{at} allow_pickle")
            if name == "load" and owner == "yaml":
                problems.append(f"{at} yaml.load (use yaml.safe_load)")
            if name in ("eval", "exec") and isinstance(call.func, ast.Name):
                problems.append(f"{at} {name}()")
            if (shell := _kw(call, "shell")) is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f"{at} shell=True")
        # the grep, for what the AST cannot see (strings handed to other tools)
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(f"{where}:{n} torch.load( without weights_only=True on the line")
            if ".pkl" in code or "pickle.load" in code:
                problems.append(f"{where}:{n} {code.strip()}")
    assert not problems, "\n".join(problems)
    assert torch_loads >= 1  # the checkpoint loader was seen, so the check above checked something


class _Payload:
    """Runs code when unpickled: what a booby-trapped checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_booby_trapped_checkpoint_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"model": {}, "iter_num": 10, "extra": _Payload(marker)}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="cannot read checkpoint .*ckpt.pt") as e:
        load_checkpoint(tmp_path / "ckpt.pt")
    assert "new --out-dir" in e.value.fix
    assert not marker.exists()
    torch.load(tmp_path / "ckpt.pt", weights_only=False)  # the same file unpickled the unsafe way...
    assert marker.exists()  # ...runs it: the test would catch a loader that did this


# -- remote commands -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node(loopback_node, tmp_path_factory):
    """The loopback 'node' with the package installed, as in test_remote.py."""
    server = loopback_node
    base, src = tmp_path_factory.mktemp("node"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    shutil.copytree(PACKAGE, src / "nanorepro", ignore=shutil.ignore_patterns("__pycache__"))
    lines: list[str] = []
    runner = remote.SSHRunner(server.host, key_path=server.key_path, user=server.user, port=server.port,
                              remote_dir=str(base / "$(touch pwned-dir)"), workdir="results/x",
                              state_dir=base / "state", poll_s=0.1, out=lines.append, local_root=src)
    runner.setup(install_cmd=sshd_helper.cheap_install())
    yield runner, lines, base, server
    runner.close()


def _pwned(base: Path) -> list[Path]:
    home = Path.home()
    return [p for p in [*base.rglob("pwned*"), *home.glob("pwned*"), *Path("/tmp").glob("pwned*")] if p.exists()]


def test_names_from_outside_cannot_inject_commands(node, tmp_path, monkeypatch):
    runner, lines, base, _ = node
    stage_dir = base / "$(touch pwned-dir)" / "results" / "x"
    assert stage_dir.is_dir()  # the odd folder name was taken literally
    # a file name, an environment value and a stage name with shell syntax in them
    src = tmp_path / "input.txt"
    src.write_text("First Citizen:\n")
    rel = "in puts/$(touch pwned-put);`touch pwned-tick`'\"/x.txt"
    runner.put(src, rel)
    assert (stage_dir / rel).read_text() == "First Citizen:\n"
    monkeypatch.setenv("NANOREPRO_REMOTE_ENV", "MSG='a; touch pwned-env $(touch pwned-sub)'")
    lines.clear()
    runner.run_command([sys.executable, "-c", "import os; print('MSG=' + os.environ['MSG'])"],
                       stage="st'age; touch pwned-stage")
    assert "MSG=a; touch pwned-env $(touch pwned-sub)" in lines
    fetched = runner.fetch(rel, tmp_path / "back")
    assert fetched.read_text() == "First Citizen:\n"
    assert not _pwned(base) and not _pwned(tmp_path)
    # an entry that is not NAME=VALUE is refused, not run
    monkeypatch.setenv("NANOREPRO_REMOTE_ENV", "A=1 ;touch pwned-semicolon")
    with pytest.raises(UserError, match="not NAME=VALUE"):
        runner.run_command(["true"], stage="x")
    assert not _pwned(base)


def test_the_private_key_is_refused_when_others_can_read_it(node, tmp_path):
    _, _, _, server = node
    key = tmp_path / "my key"
    shutil.copy(server.key_path, key)
    key.chmod(0o644)
    r = remote.SSHRunner(server.host, key_path=key, user=server.user, port=server.port, state_dir=tmp_path / "st")
    before = len(server.session_pids())
    with pytest.raises(UserError) as e:
        r.ssh.check("true", "test")
    assert f"SSH private key {key} is readable by other users (mode 644)" in str(e.value)
    assert e.value.fix == f"chmod 600 '{key}'"
    assert len(server.session_pids()) == before  # refused before connecting
    key.chmod(0o600)
    try:
        assert r.ssh.check("echo ok", "test").strip() == "ok"  # the fix works
    finally:
        r.close()
    key.chmod(0o640)
    with pytest.raises(UserError, match="readable by other users"):
        ssh.check_key_file(key)


@pytest.mark.slow
def test_reserve_refuses_a_loose_key_before_any_lease(tmp_path):
    pytest.importorskip("chi", reason="python-chi is part of the test environment")
    from fake_openstack import FakeCloud

    keys = tmp_path / "keys"
    keys.mkdir()
    sshd_helper._keygen(keys / "id")
    (keys / "id").chmod(0o604)
    with FakeCloud() as cloud:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        env.update(cloud.env(), OS_KEYPAIR_NAME="k", OS_KEYPAIR_PRIVATE_KEY=str(keys / "id"),
                   OS_KEYPAIR_PUBLIC_KEY=str(keys / "id.pub"), NANOREPRO_CHI_POLL_S="0.02", USER="tester")
        r = subprocess.run([sys.executable, "-m", "nanorepro", "reserve", "--results-dir", str(tmp_path / "r"),
                            "--site", "CHI@UC", "--no-setup"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert "is readable by other users (mode 604) (fix: chmod 600" in r.stderr
        assert not any(m == "POST" and p.endswith("/leases") for m, p in cloud.requests)
        assert cloud.live() == {"leases": [], "servers": [], "fips": []}


# -- secrets ------------------------------------------------------------------------------------
SECRETS = {
    "OS_ACCESS_TOKEN": "gAAAAAtok3n-9f8e7d6c5b4a-ACCESS",
    "OS_APPLICATION_CREDENTIAL_SECRET": "appcred-s3cr3t-4b1d9e2f",
    "OS_APPLICATION_CREDENTIAL_ID": "appcred-id-77c1a0e5d3",
    "OS_PASSWORD": "hunter2-pa55w0rd-0e9b",
    "OS_TOKEN": "os-token-5a6b7c8d9e0f",
    "OS_AUTH_URL": "https://keystone.example.invalid:5000/v3?secret=auth-url-3c2b1a",
    "HF_TOKEN": "hf_fakeTokenValue1234567890abcdef",
}


def _texts(path: Path):
    """(name, bytes) of a file, and of each member of a .tar.gz (whose compressed bytes would hide a secret)."""
    yield str(path), path.read_bytes()
    if path.name.endswith(".tar.gz"):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    yield f"{path}:{m.name}", tar.extractfile(m).read()


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_notebooks_logs_or_results(tmp_path, shakespeare_path,
                                                                        tiktoken_offline, tiny_gpt2):
    key = tmp_path / "id_ed25519"
    sshd_helper._keygen(key)
    key_body = key.read_text().splitlines()[1]
    secrets = {**SECRETS, "OS_KEYPAIR_PRIVATE_KEY": str(key)}
    results = tmp_path / "results"
    env = {**os.environ, **secrets, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    params = {"results_dir": results, "char_preset": "tiny", "input_path": shakespeare_path, "model": tiny_gpt2,
              "finetune_max_iters": 2}
    argv = [a for k, v in params.items() for a in ("-p", k, str(v))]
    r = subprocess.run([sys.executable, "-m", "nanorepro", "run-notebooks", *argv], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    b = subprocess.run([sys.executable, "-m", "nanorepro", "bundle", str(results / "runs" / "char"),
                        str(results / "runs" / "finetune"), "--out", str(results / "bundle.tar.gz")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr
    files = [p for p in results.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"00_reserve_node.ipynb", "05_release_node.ipynb", "metrics.jsonl", "env.json", "config.json",
            "REPORT.md", "report.json", "stages.jsonl", "bundle.tar.gz"} <= names  # the scan sees everything
    needles = [v for v in secrets.values() if v != str(key)] + [key_body]
    leaks = []
    for path in files:
        for name, blob in _texts(path):
            leaks += [f"{name}: {n[:12]}..." for n in needles if n.encode() in blob]
    leaks += [f"output: {n[:12]}..." for n in needles if n in r.stdout + r.stderr + b.stdout + b.stderr]
    assert not leaks, leaks
