"""Faults away from this machine: a node that reboots under a training stage, a job folder wiped, and a
cloud that fails at each point after resources exist (against tests/fake_openstack.py). What a user is
left with: the stage reported failed with a clear message and resumable, nothing left running unannounced.

Covered elsewhere, not repeated here: a dropped SSH connection and re-attaching (test_remote.py), lease
ERROR, build ERROR and a refused lease (test_chameleon.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sshd as sshd_helper
import torch

from nanorepro import metrics
from nanorepro.errors import UserError

pytestmark = pytest.mark.slow  # the loopback node, and nanorepro end to end in processes of its own

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def nanorepro(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanorepro", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=REPO, timeout=300)


# -- the remote runner: the node reboots under a training stage ---------------------------------------
@pytest.fixture(scope="module")
def node(loopback_node, tmp_path_factory):
    """The loopback 'node' with nanorepro installed from a snapshot of the package (as test_remote.py)."""
    from nanorepro.cloud.remote import SSHRunner

    server = loopback_node
    base, src = tmp_path_factory.mktemp("node"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "nanorepro", src / "nanorepro", ignore=shutil.ignore_patterns("__pycache__"))
    lines: list[str] = []
    runner = SSHRunner(server.host, key_path=server.key_path, user=server.user, port=server.port,
                       remote_dir=str(base / "node home"), workdir="results/x", state_dir=base / "state",
                       poll_s=0.1, out=lines.append, local_root=src)
    runner.setup(install_cmd=sshd_helper.cheap_install())
    yield runner, lines, base / "node home" / "results" / "x"
    runner.close()


def test_a_node_reboot_fails_the_stage_clearly_and_a_rerun_resumes_training(node, char_data_root, monkeypatch):
    runner, lines, stage_dir = node
    monkeypatch.setenv("NANOREPRO_REMOTE_ENV", "OMP_NUM_THREADS=1")
    shutil.copytree(char_data_root, stage_dir / "data", dirs_exist_ok=True)
    args = ["train", "--preset", "tiny", "--out-dir", "runs/r", "--data_root=data", "--max_iters=1500",
            "--eval_interval=50", "--lr_decay_iters=1500", "--eval_iters=1"]
    stranger = subprocess.Popen(["sleep", "300"])  # a process that took the job's pid after the reboot
    rebooted = []

    def reboot(line: str) -> None:
        if rebooted or "step 100:" not in line:  # after a progress bar's \r, maybe
            return
        (job,) = [p for p in (stage_dir / ".jobs").iterdir() if p.name.startswith("train_r-")]
        assert not (job / "rc").exists(), "the stage finished before the test could reboot its node"
        os.killpg(int((job / "pid").read_text()), signal.SIGKILL)  # everything the job ran is gone...
        (job / "pid").write_text(f"{stranger.pid}\n")  # ...its pid now names a live stranger...
        (job / "boot").write_text("a-boot-before-this-one\n")  # ...and it was recorded in another boot
        rebooted.append(job)

    runner.say = lambda line: (lines.append(line), reboot(line))
    try:
        with pytest.raises(UserError) as e:
            runner.run(args, stage="train r")
    finally:
        runner.say = lines.append
        stranger.kill()
        stranger.wait()
    assert rebooted, "the training stage never reached iteration 100"
    msg = str(e.value)
    assert "stage train r on 127.0.0.1 stopped without an exit code (killed, or the node rebooted)" in msg
    assert "re-run the stage (training resumes from its last checkpoint)" in msg
    ckpt_iter = torch.load(stage_dir / "runs" / "r" / "ckpt.pt", weights_only=True)["iter_num"]
    assert ckpt_iter >= 100

    lines.clear()
    assert runner.run(args, stage="train r") == 0  # the same cell again: a new job, not an attach
    text = "\n".join(lines)
    assert "already running" not in text and f"resuming runs/r from iter {ckpt_iter}" in text
    records = metrics.read(stage_dir / "runs" / "r" / "metrics.jsonl")
    assert [r["iter"] for r in metrics.of_kind(records, "train")] == list(range(1, 1501))
    assert metrics.finished(records)


def test_a_job_whose_pid_file_vanished_is_reported_not_waited_for(node):
    runner, _, _ = node
    script = ("import glob, os, time\ntime.sleep(1)\n"
              "for p in glob.glob('.jobs/wiped-*/pid'):\n    os.unlink(p)\n"  # a wiped job folder...
              "os.kill(os.getppid(), 9); os.kill(os.getpid(), 9)\n")  # ...and no exit code
    # the poll loop's only way out without an exit code is the liveness check: reaching this error
    # means the vanished pid was noticed rather than waited on
    with pytest.raises(UserError, match="stopped without an exit code"):
        runner.run_command([sys.executable, "-c", script], stage="wiped")


# -- the cloud: failures after resources exist ----------------------------------------------------------
@pytest.fixture
def cloud_env(tmp_path, monkeypatch):
    from fake_openstack import FakeCloud

    pytest.importorskip("chi", reason="python-chi is part of the test environment (pip install -e '.[chameleon]')")
    keys = tmp_path / "keys"
    keys.mkdir()
    sshd_helper._keygen(keys / "id")
    with FakeCloud() as cloud:
        cloud.fip_reservable = False  # the floating IP comes from the on-demand pool, after the boot
        env = {k: v for k, v in ENV.items() if not k.startswith("OS_")}
        env.update(cloud.env(), OS_KEYPAIR_NAME="tester-jupyter", OS_KEYPAIR_PRIVATE_KEY=str(keys / "id"),
                   OS_KEYPAIR_PUBLIC_KEY=str(keys / "id.pub"), NANOREPRO_CHI_POLL_S="0.02", USER="tester",
                   NANOREPRO_SSH_PORT=str(sshd_helper._free_port()))  # nothing answers SSH there
        yield cloud, env


def posted(cloud, suffix: str) -> int:
    return sum(1 for m, p in cloud.requests if m == "POST" and p.endswith(suffix))


NOTHING = {"leases": [], "servers": [], "fips": []}


@pytest.mark.parametrize("fault, made, message", [
    # Blazar makes the lease but its reply is lost: found by name and released
    (("POST", r"/blazar/v1/leases$", "drop", 0), "/leases", "but Blazar made it"),
    (("POST", r"/blazar/v1/leases$", "after", 500), "/leases", "Chameleon refused the lease"),
    (("POST", r"/nova/v2.1/servers$", "before", 500), "/leases", "Nova refused to create server"),
    (("POST", r"/nova/v2.1/servers$", "after", 500), "/servers", "Nova refused to create server"),
    (("POST", r"/neutron/v2.0/floatingips$", "before", 500), "/servers", "injected fault 500"),
    (("PUT", r"/neutron/v2.0/floatingips/", "before", 500), "/floatingips", "floating ip 127.0.0.1"),
], ids=["lease-reply-lost", "lease-500-after-making-it", "server-refused", "server-500-after-making-it",
        "floating-ip-refused", "floating-ip-not-bound"])
def test_a_cloud_failure_after_resources_exist_releases_them_and_says_so(cloud_env, tmp_path, fault, made, message):
    cloud, env = cloud_env
    cloud.faults.append(fault)
    cloud.fip_reservable = made == "/leases" and "blazar" in fault[1]  # the lease's own POST is the one that fails
    results = tmp_path / "results"
    r = nanorepro("reserve", "--results-dir", str(results), "--site", "CHI@UC", "--hours", "2", "--no-setup", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert posted(cloud, made) >= 1  # the resource existed before the failure
    assert r.stderr.count("\n") == 1 and message in r.stdout + r.stderr
    assert "were released: nothing is left running" in r.stderr
    assert cloud.live() == NOTHING
    # never a second lease (a site that refuses the floating IP in the lease is asked once more, without it)
    assert posted(cloud, "/leases") == (1 if cloud.fip_reservable else 2)
    assert json.loads((results / "chameleon_node.json").read_text())["status"] == "released"


def test_ssh_never_answering_releases_everything(cloud_env, tmp_path):
    cloud, env = cloud_env
    code = ("from nanorepro import errors\nfrom nanorepro.cloud import chameleon\n"
            "try:\n"
            f"    chameleon.reserve('chameleon', site='CHI@UC', lease_hours=2, state_dir={str(tmp_path)!r}, "
            "ssh_timeout_s=0.5)\n"
            "except errors.UserError as e:\n"
            "    print('ERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "ERROR the node at 127.0.0.1 does not answer SSH on port" in r.stdout, r.stdout + r.stderr
    assert "were released: nothing is left running" in r.stdout
    assert posted(cloud, "/floatingips") == 1 and cloud.live() == NOTHING


def test_an_interrupted_reservation_says_what_runs_and_release_finds_it(cloud_env, tmp_path):
    cloud, env = cloud_env
    cloud.polls_to_active = 10**9  # the lease never starts: the user gives up and presses stop
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "nanorepro", "reserve", "--results-dir", str(results),
                             "--site", "CHI@UC", "--hours", "2", "--no-setup"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background jobs inherit SIGINT ignored: give the child the default back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(m == "GET" and re.search(r"/leases/[0-9a-f-]{36}$", p)
                                                  for m, p in list(cloud.requests)):
        time.sleep(0.05)  # until it polls the lease it made: waiting for ACTIVE
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "interrupted: lease nanorepro-tester" in out and "is STILL RUNNING until" in out
    command = re.search(r"in a terminal: `cd \S+ && python3 -m nanorepro ([^`]+)`", out).group(1)
    assert len(cloud.live()["leases"]) == 1  # announced, and still there
    cloud.faults.append(("DELETE", r"/blazar/v1/leases/", "before", 500))  # releasing fails once...
    r = nanorepro(*shlex.split(command), env=env)
    assert r.returncode == 2 and "releasing failed" in r.stderr and "is STILL RUNNING" in r.stderr
    cloud.faults.clear()  # ...and works when the site is back
    r = nanorepro(*shlex.split(command), env=env)
    assert r.returncode == 0, r.stderr
    assert cloud.live() == NOTHING


def test_a_killed_reservation_leaves_a_record_release_can_use(cloud_env, tmp_path):
    cloud, env = cloud_env
    cloud.polls_to_active = 10**9
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "nanorepro", "reserve", "--results-dir", str(results),
                             "--site", "CHI@UC", "--hours", "2", "--no-setup"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not cloud.live()["leases"]:
        time.sleep(0.05)
    proc.kill()  # the hub kernel dies without a word
    proc.wait()
    assert len(cloud.live()["leases"]) == 1
    r = nanorepro("release", "--results-dir", str(results), env=env)
    assert r.returncode == 0, r.stderr
    assert cloud.live() == NOTHING
