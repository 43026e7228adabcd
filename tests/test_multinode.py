"""A lease of two nodes, as two loopback sshd "nodes" (tests/sshd.py): node 1 reachable only through the
head, nanorepro installed on both at once and recorded per node, each node's firewall (a strict
firewall-cmd stand-in; from node 1 nothing but SSH reaches the head until the head's admits the network)
opened by setup and the head's rendezvous port checked, a stage that fails on one node stopping the
other, and the real job script running torchrun over both (gloo on the CPU, one process and one thread
per node, on the interface setup found) to train `tiny`: the same losses as one process with the same
global batch; a node killed mid-run, or one that stops answering, fails the stage on both, naming it
(not the node whose ranks lost their peer), and a re-run resumes from the head's last checkpoint.

Why the losses can match: as in test_distributed.py, every rank walks the same batch stream and takes
its share of each iteration's micro-batches, so 2 ranks x 1 micro-step see exactly the samples one
process x 2 micro-steps sees; only the order of float32 sums differs (the all-reduce). TOL is
test_distributed's bound: measured here, both the 20-step run and the 150-step run killed at about
iter 75 and resumed stay within 1e-5 of one process (exact resume on the CPU, see train.py); since
2026-12-07 node 1 is killed once the head's first checkpoint (iter 25) is on disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sshd as sshd_helper
import torch
from sshd import alive, processes_in
from test_distributed import assert_close, losses  # the same losses, the same comparison

from nanorepro import metrics
from nanorepro.cloud import chameleon, jobs, multinode, network, remote, ssh
from nanorepro.cloud.jobs import job_for
from nanorepro.cloud.node import NODE_FILE
from nanorepro.cloud.remote import SSHRunner
from nanorepro.errors import UserError
from nanorepro.pipeline import Pipeline

TOL = 1e-4
LEASE = "nanorepro-tester"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two sshd nodes; from this process node 1 can only be reached through node 0, and from node 1 nothing
    but SSH reaches node 0 until node 0's firewalld (the stand-in) admits the network (sshd.start_firewalled_nodes)."""
    tmp = tmp_path_factory.mktemp("nodes")
    try:
        servers = sshd_helper.start_firewalled_nodes(tmp, 2, tmp / "bin")
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        with sshd_helper.reachable_only_through_head(servers):
            yield servers
    finally:
        for server in servers:
            server.stop()


def reserved(nodes, state: Path, remote_dir: str = "nanorepro") -> Path:
    """A results folder holding the record of a two-node lease, as 00_reserve_node leaves it."""
    head = nodes[0]
    state.mkdir(parents=True, exist_ok=True)
    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=3, minutes=1)
    (state / NODE_FILE).write_text(json.dumps({
        "host": head.host, "port": head.port, "user": head.user, "key_path": str(head.key_path),
        "remote_dir": remote_dir, "site": "CHI@UC", "lease_name": LEASE, "lease_id": "lease-1",
        "lease_end": end.isoformat(), "status": "ready", "rdzv_port": sshd_helper._free_port(),
        "nodes": [{"name": f"{LEASE}-{i}", "server_id": f"server-{i}", "private_ip": "127.0.0.1", "ssh_port": n.port}
                  for i, n in enumerate(nodes)]}))
    return state


def stage_dir(node, state: Path, remote_dir: str = "nanorepro") -> Path:
    """The node's mirror of the results folder (a folder outside the checkout: work/<its name>)."""
    return node.home / remote_dir / "work" / state.name


def record_of(state: Path) -> dict:
    return json.loads((state / NODE_FILE).read_text())


def parallel_install(tmp: Path) -> str:
    """The cheap install, entered only once both nodes have started installing (so it cannot pass when the
    nodes install one after the other); 60 s without the other node fails it, instead of hanging."""
    meet = tmp / "meet"
    meet.mkdir()
    here = f'{meet}/"$(basename "$(dirname "$HOME")")"'
    return (f"touch {here}; i=0; while [ $(ls {meet} | wc -l) -lt 2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
            f"[ $(ls {meet} | wc -l) -ge 2 ] || {{ echo 'the other node never started: not in parallel'; exit 1; }}; "
            + sshd_helper.cheap_install())


@pytest.fixture(scope="module")
def installed(nodes, tmp_path_factory):
    """The lease's results folder, with nanorepro installed on both nodes by setup_node (the working tree's code)."""
    tmp = tmp_path_factory.mktemp("lease")
    state = reserved(nodes, tmp / "results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOREPRO_INSTALL_CMD", parallel_install(tmp))
        mp.setenv("NANOREPRO_SSH_POLL_S", "0.1")
        assert chameleon.setup_node("chameleon", state) == state / "node"
    return state


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("NANOREPRO_SSH_POLL_S", "0.1")
    monkeypatch.setenv("NANOREPRO_REMOTE_ENV", "OMP_NUM_THREADS=1")  # one thread per rank (2 ranks share the core)


# -- reaching the nodes ------------------------------------------------------------------------------
def test_node_1_is_reachable_only_through_the_head(nodes, tmp_path):
    head, other = nodes
    direct = SSHRunner(other.host, key_path=other.key_path, user=other.user, port=other.port, connect_timeout_s=5)
    with pytest.raises(UserError, match=f"cannot reach {other.user}@127.0.0.1:{other.port} over SSH"):
        direct.ssh.check("true", "test")  # the stand-in for a private address really refuses this process
    state = reserved(nodes, tmp_path / "results")
    runner = SSHRunner.from_state(state)
    try:
        assert [n.ssh.check("pwd", "pwd").strip() for n in runner.nodes] == [str(head.home), str(other.home)]
        assert runner.peers[0].ssh.address == f"{other.user}@127.0.0.1:{other.port} (through 127.0.0.1)"
    finally:
        runner.close()
    known = (state / ssh.KNOWN_HOSTS).read_text()  # both host keys pinned, in the one known_hosts
    for server in nodes:
        host_key = (server.dir / "host_ed25519.pub").read_text().split()[1]
        assert f"[127.0.0.1]:{server.port} ssh-ed25519 {host_key}" in known


def test_a_changed_host_key_of_an_inner_node_is_refused(nodes, tmp_path):
    import paramiko

    state = reserved(nodes, tmp_path / "results")
    other = paramiko.Ed25519Key.from_private_key_file(str(nodes[0].key_path))  # any key but node 1's
    (state / ssh.KNOWN_HOSTS).write_text(f"[127.0.0.1]:{nodes[1].port} {other.get_name()} {other.get_base64()}\n")
    runner = SSHRunner.from_state(state)
    try:
        assert runner.ssh.check("echo ok", "test").strip() == "ok"  # the head's key is new: pinned
        with pytest.raises(UserError, match="host key of 127.0.0.1 changed"):
            runner.peers[0].ssh.check("true", "test")
    finally:
        runner.close()


def test_an_old_record_without_nodes_is_one_node(nodes, tmp_path):
    state = reserved(nodes, tmp_path / "results")
    record = record_of(state)
    del record["nodes"]
    (state / NODE_FILE).write_text(json.dumps(record))
    runner = SSHRunner.from_state(state)
    assert runner.nodes == [runner] and runner.peers == []
    assert remote.stage_argv("py", ["train"], "ddp", 4)[:4] == ["py", "-m", "torch.distributed.run", "--standalone"]


# -- installing ------------------------------------------------------------------------------------
def test_setup_installs_on_both_nodes_at_once_and_records_each(installed, nodes):
    state = installed
    for i, folder in enumerate(("node", "node-1")):
        env = json.loads((state / folder / "env.json").read_text())
        assert env["python"] and (state / folder / "nvidia-smi.txt").is_file()
        assert (nodes[i].home / "nanorepro" / ".venv" / "bin" / "python").exists()
    setup = [n["setup"] for n in record_of(state)["nodes"]]
    assert [(s["status"], s["folder"]) for s in setup] == [("ready", "node"), ("ready", "node-1")]


def firewalld(node) -> Path:
    """The node's firewalld as the stand-in keeps it (sshd.start_firewalled_nodes)."""
    return node.dir / "firewalld"


def test_setup_opens_each_node_s_firewall_to_the_private_network_and_checks_the_rendezvous_port(installed, nodes):
    # both firewalls admitted only SSH (node 1 could not reach the head's port); setup admitted the network in each
    for node in nodes:
        state = json.loads((firewalld(node) / "state.json").read_text())
        assert state["runtime"]["trusted"] == ["127.0.0.0/8"] and state["permanent"]["trusted"] == ["127.0.0.0/8"]
        assert (firewalld(node) / "calls.log").read_text().splitlines() == [  # as root: no sudo
            "--state", "--zone=trusted --add-source=127.0.0.0/8", "--runtime-to-permanent",
            "--zone=trusted --list-sources"]
    network = [n["network"] for n in record_of(installed)["nodes"]]
    assert [(n["status"], n["iface"], n["cidr"]) for n in network] == [("ready", "lo", "127.0.0.0/8")] * 2
    assert all("now admits 127.0.0.0/8 (kept across reboots)" in n["firewall"] for n in network)
    runner = SSHRunner.from_state(installed)
    try:
        assert [n.iface for n in runner.nodes] == ["lo", "lo"]
    finally:
        runner.close()


@pytest.mark.parametrize("firewall", ["absent", "refusing"])
def test_a_closed_firewall_that_cannot_be_opened_fails_setup_naming_the_node_and_port(
        installed, nodes, firewall, tmp_path, monkeypatch):
    """The head's firewall shut again, and either no firewall-cmd on the nodes (another firewall, say) or a
    firewalld that refuses (the network already bound to another zone): node 1 cannot reach the head's port."""
    monkeypatch.setattr(network, "PORT_CHECK_S", 3.0)
    monkeypatch.setenv("NANOREPRO_SSH_POLL_S", "0.1")
    # the install command `installed` used (after the code's digest in its marker): setup finds it done
    marker = (nodes[0].home / "nanorepro" / ".nanorepro-installed").read_text().strip()
    monkeypatch.setenv("NANOREPRO_INSTALL_CMD", marker.split(" ", 1)[1])
    state = tmp_path / "closed"  # the same lease and installed code, its own record
    state.mkdir()
    for name in (NODE_FILE, ssh.KNOWN_HOSTS):
        shutil.copy(installed / name, state / name)
    head_state, tool = firewalld(nodes[0]), nodes[0].dir.parent / "bin" / "firewall-cmd"
    saved = {name: (head_state / name).read_bytes() for name in ("state.json", "filter")}
    try:
        if firewall == "absent":
            sshd_helper.firewall_state(head_state)
            tool.rename(tool.with_name("firewall-cmd.away"))
        else:
            sshd_helper.firewall_state(head_state, other={"internal": ["127.0.0.0/8"]})
        with pytest.raises(UserError) as e:
            chameleon.setup_node("chameleon", state)
    finally:
        if firewall == "absent":
            tool.with_name("firewall-cmd.away").rename(tool)
        for name, content in saved.items():
            (head_state / name).write_bytes(content)
    problem, port = e.value.problem, record_of(state)["rdzv_port"]
    assert problem.startswith("the nodes cannot train together: ")
    assert (f"node 1 ({LEASE}-1, {nodes[1].user}@127.0.0.1:{nodes[1].port} (through 127.0.0.1)) cannot reach the "
            f"head's rendezvous port 127.0.0.1:{port} (TCP): OSError: No route to host (a firewall rejects it") in problem
    assert "node 0 (" + LEASE + "-0, " + f"{nodes[0].user}@127.0.0.1:{nodes[0].port}) cannot reach" not in problem
    if firewall == "absent":
        assert "the head's firewall: no firewall-cmd on the node: nothing opened" in problem
    else:
        assert (f"node 0 ({LEASE}-0, {nodes[0].user}@127.0.0.1:{nodes[0].port}): `firewall-cmd --zone=trusted "
                "--add-source=127.0.0.0/8` failed on 127.0.0.1 (exit 18): Error: ZONE_CONFLICT: '127.0.0.0/8' already "
                "bound to a zone") in problem
        assert f"on {LEASE}-0, run `sudo firewall-cmd --zone=trusted --add-source=127.0.0.0/8`" in e.value.fix
    assert f"lease {LEASE} (lease-1) at CHI@UC is STILL RUNNING" in problem
    assert "`sudo firewall-cmd --zone=trusted --add-source=127.0.0.0/8` and `sudo firewall-cmd --runtime-to-permanent` " \
           "on each node" in e.value.fix and f"TCP port {port}" in e.value.fix
    assert [n["network"]["status"] for n in record_of(state)["nodes"]] == ["failed", "failed"]
    runner = SSHRunner.from_state(state)  # a train stage now refuses to start instead of hanging
    try:
        with pytest.raises(UserError, match="was not prepared for training on several nodes"):
            runner.run(["train"], stage="train", parallel="ddp")
    finally:
        runner.close()


def test_the_stand_in_firewall_holds_torch_s_own_connections_until_the_head_admits_the_network(installed, nodes):
    """The gate is no Python-only stub: torch's store client (C++, over IPv6) on node 1 is refused by the head's
    shut firewall as a real node's would be, and gets through once the head's trusted zone admits 127.0.0.0/8."""

    from torch.distributed import TCPStore

    port = sshd_helper._free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)  # where the head's would listen
    client = ("import datetime, sys\nfrom torch.distributed import TCPStore\ntry:\n"
              f"    TCPStore('127.0.0.1', {port}, is_master=False, timeout=datetime.timedelta(seconds=2))\n"
              "except Exception as e:\n    sys.exit(str(e)[-300:])\nprint('connected')")
    head_state = firewalld(nodes[0])
    saved = {name: (head_state / name).read_bytes() for name in ("state.json", "filter")}
    runner = SSHRunner.from_state(installed)
    try:
        python = "nanorepro/.venv/bin/python"
        sshd_helper.firewall_state(head_state)  # shut: only SSH
        code, out = runner.peers[0].ssh.exec(f"{python} -c {shlex.quote(client)}")
        assert code == 1 and "No route to host" in out
        code, out = runner.ssh.exec("firewall-cmd --zone=trusted --add-source=127.0.0.0/8")  # the head opens
        assert code == 0, out
        code, out = runner.peers[0].ssh.exec(f"{python} -c {shlex.quote(client)}")
        assert code == 0 and out.strip().endswith("connected"), out
    finally:
        runner.close()
        for name, content in saved.items():
            (head_state / name).write_bytes(content)
        del store


class LocalNode:
    """A node whose commands run on this machine (no sshd), with stand-ins first on PATH."""

    def __init__(self, bin_dir: Path, state: Path):
        self.host, self.name, self.ssh = "127.0.0.1", "local", self
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NANOREPRO_TEST_FIREWALLD": str(state)}

    def exec(self, command: str, timeout: float = 120.0, retry: bool = True) -> tuple[int, str]:
        r = subprocess.run(["sh", "-c", command], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout)
        return r.returncode, r.stdout


# sudo as the cc user on Chameleon has it: -n runs the command (here as the same user) or, when a password is
# needed ($D/password exists), says so; without -n it would prompt, and there is no terminal
SUDO = """#!/bin/sh
D=$(dirname "$0")
echo "sudo $*" >> "$D/sudo.log"
no_tty="sudo: a terminal is required to read the password; either use the -S option to read from standard input"
[ "$1" = "-n" ] || { echo "$no_tty or configure an askpass helper" >&2; exit 1; }
shift
[ -f "$D/password" ] && { echo "sudo: a password is required" >&2; exit 1; }
exec "$@"
"""


def test_a_user_who_is_not_root_opens_the_firewall_with_sudo_n_or_is_told_how(tmp_path):
    bin_dir, state = tmp_path / "bin", tmp_path / "firewalld"
    sshd_helper.firewall_standin(bin_dir)
    sshd_helper.firewall_state(state)
    (bin_dir / "sudo").write_text(SUDO)
    (bin_dir / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && { echo 1000; exit 0; }; exec /usr/bin/id "$@"\n')
    for name in ("sudo", "id"):
        (bin_dir / name).chmod(0o755)
    node = LocalNode(bin_dir, state)
    (bin_dir / "password").touch()
    with pytest.raises(UserError) as e:
        network.open_firewall(node, "10.140.80.0/22")
    assert e.value.problem == "`sudo -n firewall-cmd --state` failed on 127.0.0.1 (exit 1): sudo: a password is required"
    assert "sudo firewall-cmd --zone=trusted --add-source=10.140.80.0/22" in e.value.fix
    (bin_dir / "password").unlink()
    assert network.open_firewall(node, "10.140.80.0/22") == \
        "firewalld's trusted zone now admits 10.140.80.0/22 (kept across reboots)"
    assert "sudo -n firewall-cmd --zone=trusted --add-source=10.140.80.0/22" in (bin_dir / "sudo.log").read_text()
    assert json.loads((state / "state.json").read_text())["permanent"]["trusted"] == ["10.140.80.0/22"]
    # again: already admitted (firewalld warns, exits 0), still there
    assert "already admitted 10.140.80.0/22" in network.open_firewall(node, "10.140.80.0/22")
    sshd_helper.firewall_state(state, running=False)
    assert network.open_firewall(node, "10.140.80.0/22") == "firewalld is not running: nothing opened"
    (bin_dir / "firewall-cmd").unlink()
    assert network.open_firewall(node, "10.140.80.0/22") == "no firewall-cmd on the node: nothing opened"


def test_the_interface_holding_the_private_address_and_its_subnet_come_from_ip():
    out = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
           "2: eno1    inet 10.140.81.23/22 brd 10.140.83.255 scope global dynamic eno1\\       valid_lft 86313sec\n"
           "3: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever\n")
    assert network.interface_of(out, "10.140.81.23") == ("eno1", "10.140.80.0/22")
    with pytest.raises(UserError, match=r"no interface holds the private address 10.140.81.99 \(IPv4 addresses: "
                                        r"lo 127.0.0.1/8, eno1 10.140.81.23/22, docker0 172.17.0.1/16\)"):
        network.interface_of(out, "10.140.81.99")
    assert remote.interface_env("eno1") == ["env", "NCCL_SOCKET_IFNAME=eno1", "GLOO_SOCKET_IFNAME=eno1"]
    assert remote.interface_env(None) == []


def test_an_interface_the_user_names_is_left_to_the_user(monkeypatch):
    monkeypatch.setenv("NANOREPRO_REMOTE_ENV", "NCCL_SOCKET_IFNAME=ib0 HF_HOME=/data")
    assert remote.interface_env("eno1") == ["env", "GLOO_SOCKET_IFNAME=eno1"]


def test_a_node_whose_install_fails_is_named_with_the_lease(nodes, tmp_path, monkeypatch, capsys):
    state = reserved(nodes, tmp_path / "results", remote_dir="other")
    monkeypatch.setenv("NANOREPRO_SSH_POLL_S", "0.1")
    monkeypatch.setenv("NANOREPRO_INSTALL_CMD", 'case "$HOME" in */node1/home) echo "No space left on device"; '
                       "exit 3;; esac; " + sshd_helper.cheap_install())
    with pytest.raises(UserError) as e:
        chameleon.setup_node("chameleon", state)
    problem = e.value.problem
    assert problem.startswith(f"setup failed on node 1 ({LEASE}-1, ")
    assert "stage setup failed on 127.0.0.1 (exit 3)" in problem and "No space left on device" in problem
    assert "(the other node installed fine)" in problem
    assert f"lease {LEASE} (lease-1) at CHI@UC is STILL RUNNING until" in problem
    setup = [n["setup"] for n in record_of(state)["nodes"]]
    assert setup[0]["status"] == "ready" and setup[1]["status"] == "failed"
    assert "No space left on device" in setup[1]["error"]
    assert (state / "node" / "env.json").is_file() and not (state / "node-1").exists()
    out = capsys.readouterr().out
    assert "[node 0] node ready" in out and "[node 1] No space left on device" in out  # whose line is whose


# -- stages on every node --------------------------------------------------------------------------
def test_a_stage_that_fails_on_one_node_stops_the_other(installed, nodes, fast, monkeypatch):
    monkeypatch.setattr(multinode, "PEER_GRACE_S", 1.0)
    lines: list[str] = []
    runner = SSHRunner.from_state(installed, out=lines.append)
    argvs = [[sys.executable, "-c", "import time\nprint('head waiting', flush=True)\ntime.sleep(600)"],
             [sys.executable, "-c", "import sys\nprint('disk full here', flush=True)\nsys.exit(3)"]]
    try:
        with pytest.raises(UserError) as e:
            runner.run_everywhere(argvs, stage="doomed")
    finally:
        runner.close()
    problem = e.value.problem
    assert problem.startswith(f"stage doomed failed on node 1 ({LEASE}-1, ")
    assert f"of lease {LEASE}: exit 3; its job was stopped on node 0" in problem
    assert "disk full here" in problem  # node 1's log, which was not streamed
    assert "head waiting" in lines  # node 0's was
    (job,) = (stage_dir(nodes[0], installed) / ".jobs").glob("doomed-*")
    assert not (job / "rc").exists() and not alive(int((job / "pid").read_text()))
    assert not processes_in([stage_dir(n, installed) for n in nodes])  # the sleeping python too


# node 1's job: it says so, lets the head's rank "lose" it, and a moment later dies (its job's shell and itself
# killed, no exit code: "gone") or crashes on its own (exit 3); the head's rank fails first, as a rank whose
# partner went away does, with gloo's words for it
DYING = {"killed": "time.sleep(1.0)\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(os.getpid(), signal.SIGKILL)",
         "crashed": "time.sleep(1.0)\nprint('torch.OutOfMemoryError: CUDA out of memory.', flush=True)\nsys.exit(3)"}
LOSING = ("import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
          "print('[rank0]: RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [10.140.81.24]:41234: "
          "Connection reset by peer', flush=True)\nsys.exit(1)")


@pytest.mark.parametrize("death", ["killed", "crashed"])
def test_the_node_that_failed_is_named_not_the_one_that_lost_its_peer_first(installed, fast, death, tmp_path):
    mark = tmp_path / "node-1-is-going"
    dying = f"import os, signal, sys, time\nprint('rank 1 going', flush=True)\nopen(sys.argv[1], 'w').close()\n{DYING[death]}"
    runner = SSHRunner.from_state(installed, out=lambda line: None)
    try:
        with pytest.raises(UserError) as e:
            runner.run_everywhere([[sys.executable, "-c", LOSING, str(mark)], [sys.executable, "-c", dying, str(mark)]],
                                  stage=f"lose-{death}")
    finally:
        runner.close()
    how = "it stopped without an exit code (killed, or the node rebooted)" if death == "killed" else "exit 3"
    assert e.value.problem.startswith(f"stage lose-{death} failed on node 1 ({LEASE}-1, ")
    assert (f"of lease {LEASE}: {how}; node 0's job failed after it (exit 1, after losing a peer: [rank0]: "
            "RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [10.140.81.24]:41234: Connection reset by peer)"
            in e.value.problem)
    assert "the last lines of node 1's log (" in e.value.problem and "rank 1 going" in e.value.problem
    assert ("CUDA out of memory" in e.value.problem) == (death == "crashed")


def test_a_rerun_attaches_to_jobs_running_on_every_node_and_restarts_a_partial_run(installed, fast):
    lines: list[str] = []
    runner = SSHRunner.from_state(installed, out=lines.append)
    code = "import sys, time\nprint('beat', sys.argv[1], flush=True)\ntime.sleep(5)\nprint('done', sys.argv[1], flush=True)"
    argvs = [[sys.executable, "-c", code, str(i)] for i in range(2)]
    try:
        # the kernel that started the jobs died: start them as run_everywhere does, then walk away
        started = [job_for(argv, "beat") for argv in argvs]
        for node, (cmd, job) in zip(runner.nodes, started):
            assert node.jobs.launch(cmd, job, node.stage_dir) == "started"
        assert runner.run_everywhere(argvs, stage="beat") == 0
        assert "[beat] already running on all 2 nodes: attaching to it" in lines
        assert "done 0" in lines and lines.count("beat 0") <= 1
        # only node 1's job still runs (node 0's ended): it cannot meet a new partner, so it is stopped
        lines.clear()
        node1 = runner.peers[0]
        assert node1.jobs.launch(*started[1], node1.stage_dir) == "started"
        assert runner.run_everywhere(argvs, stage="beat") == 0
        assert any(line.startswith("[beat] stopping what is left of an earlier run on node 1 (") for line in lines)
        assert any(line.startswith("[beat] started on 2 nodes") for line in lines) and "done 0" in lines
    finally:
        runner.close()


# -- training over both nodes ----------------------------------------------------------------------
def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (what a dying node does to its jobs)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    with contextlib.suppress(ProcessLookupError):  # gone already: its parent's death took it
        os.kill(pid, 9)
    for child in children:
        kill_tree(int(child))


def one_process(out: Path, data_root: Path, max_iters: int, **overrides) -> list[tuple]:
    """The same training in one process (2 micro-steps per iteration): its logged losses."""
    args = [f"--{k}={v}" for k, v in overrides.items()]
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "tiny", f"--data_root={data_root}",
                        f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", "--gradient_accumulation_steps=2",
                        "--out-dir", str(out), *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return losses(out)


def overrides(max_iters: int, **more) -> dict:
    return {"parallel": "ddp", "gradient_accumulation_steps": 2, "lr_decay_iters": max_iters, **more}


def test_two_nodes_train_tiny_with_the_losses_of_one_process(installed, nodes, fast, shakespeare_path,
                                                             char_data_root, tmp_path, capsys):
    run = Pipeline(installed, target="chameleon")
    try:
        run.prepare_data(input_path=str(shakespeare_path), encodings="char")
        summary = run.train("ddp", preset="tiny", max_iters=20, overrides=overrides(20, eval_interval=5, eval_iters=3))
        out = capsys.readouterr().out
        # run again: rank 0 finds the run finished in its records, and node 1 (which has none) follows it
        again = run.train("ddp", preset="tiny", max_iters=20, overrides=overrides(20, eval_interval=5, eval_iters=3))
    finally:
        run.runner.close()
    assert summary["status"] == "finished" and again["status"] == "finished"
    assert "[train ddp] started on 2 nodes" in out and "step 20: train loss" in out  # rank 0's output, streamed
    assert "runs/ddp: already finished at iter 20" in capsys.readouterr().out
    head, other = (stage_dir(n, installed) for n in nodes)
    for d in (head, other):  # each node prepared its own data
        assert (d / "data" / "shakespeare_char" / "train.bin").is_file()
    (job,) = (other / ".jobs").glob("train_ddp-*")  # node 1 ran its share, and wrote nothing of the run
    script = (job / "run.sh").read_text()
    assert "--nnodes=2" in script and "--node_rank=1" in script and "--rdzv_backend=static" in script
    assert "NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo " in script  # the interface holding the private address
    (head_job,) = (head / ".jobs").glob("train_ddp-*")
    assert "NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo " in (head_job / "run.sh").read_text()
    assert (job / "rc").read_text().strip() == "0"
    assert not (other / "runs" / "ddp" / metrics.METRICS_FILE).exists() and not (other / "runs" / "ddp" / "ckpt.pt").exists()
    reference = one_process(tmp_path / "one", char_data_root, 20, eval_interval=5, eval_iters=3)
    assert_close(losses(installed / "runs" / "ddp"), reference, TOL)


def test_a_killed_node_fails_the_stage_on_both_and_a_rerun_resumes(installed, nodes, fast, shakespeare_path,
                                                                  char_data_root, tmp_path, capsys):
    head, other = (stage_dir(n, installed) for n in nodes)
    run = Pipeline(installed, target="chameleon")
    killed: list[float] = []
    done = threading.Event()

    def kill_node_1() -> None:
        """Once the head's first checkpoint is on disk (iter 25 of 150), kill node 1's job whole. Watching the
        file, not the streamed log, which lags the training by up to a hundred iterations here: a kill on
        the log's "step 50" line sometimes came after the run had ended."""
        while not done.is_set():
            jobs = list((other / ".jobs").glob("train_long-*/pid"))
            if jobs and (head / "runs" / "long" / "ckpt.pt").exists():
                assert not (jobs[0].parent / "rc").exists(), "node 1's job ended before the test could kill it"
                killed.append(time.monotonic())  # before: the stage may fail before the whole tree is killed
                kill_tree(int(jobs[0].read_text()))
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_node_1, daemon=True)
    killer.start()
    args = dict(preset="tiny", max_iters=150, overrides=overrides(150, eval_interval=25, eval_iters=1))
    try:
        if not (head / "data").exists():
            run.prepare_data(input_path=str(shakespeare_path), encodings="char")
        with pytest.raises(UserError) as e:
            run.train("long", **args)
        problem = e.value.problem
        assert killed, "the stage ended before the test could kill node 1"
        assert problem.startswith(f"stage train long failed on node 1 ({LEASE}-1, ")
        with capsys.disabled():  # for the record (-s), never asserted: timings here are noisy
            print(f"\nthe stage failed {time.monotonic() - killed[0]:.1f} s after node 1's job was killed: "
                  f"{problem.splitlines()[0]}")
        # node 1 is named whether or not the head's ranks (which lost their peer) exited before it was seen gone
        assert f"{LEASE}: it stopped without an exit code (killed, or the node rebooted); " in problem
        assert ("; node 0's job failed after it (exit 1, after losing a peer: " in problem
                or "; its job was stopped on node 0 so that none waits for it" in problem)
        assert "node 1's log (nanorepro/work/results/.jobs/train_long-" in problem  # its last lines, or that it is empty
        assert "node 0's log" not in problem
        assert f"lease {LEASE} (lease-1) at CHI@UC is STILL RUNNING" in problem
        assert "resumes from the last checkpoint" in e.value.fix
        # both nodes' jobs are gone: nothing waits on the dead node
        assert not processes_in([head, other])
        saved = torch.load(head / "runs" / "long" / "ckpt.pt", weights_only=True)["iter_num"]
        assert saved >= 25 and not (other / "runs" / "long" / "ckpt.pt").exists()  # only on the head
        capsys.readouterr()
        summary = run.train("long", **args)
    finally:
        done.set()
        killer.join()
        run.runner.close()
    out = capsys.readouterr().out
    assert f"resuming runs/long from iter {saved} " in out  # node 1 resumed from the head's checkpoint too
    assert summary["status"] == "finished"
    reference = one_process(tmp_path / "one", char_data_root, 150, eval_interval=25, eval_iters=1)
    assert_close(losses(installed / "runs" / "long"), reference, TOL)


@pytest.mark.slow
@pytest.mark.parametrize("death", ["off", "frozen"])
def test_a_node_that_stops_answering_stops_the_job_on_the_others_and_is_named(tmp_path, monkeypatch, capsys, death):
    """Node 1 dies whole while the head's rank waits for it (as NCCL's would, for 10 minutes): switched off (its
    job and sshd gone: connections to it refused) or frozen (all its processes stopped: connections open but
    nothing ever answers, as a hung kernel does). After UNREACHABLE_S of silence the head's job is stopped and
    the stage fails naming node 1, not after RECONNECT_TIMEOUT_S (cut to 120 s here, so that a watcher waiting
    for the dead node fails this test instead of hanging it)."""
    monkeypatch.setattr(ssh, "RECONNECT_TIMEOUT_S", 120.0)
    monkeypatch.setenv("NANOREPRO_SSH_POLL_S", "0.2")
    servers = sshd_helper.start_nodes(tmp_path / "nodes", 2)
    lines: list[str] = []
    dead: list[int] = []  # node 1's processes, stopped or killed
    died: list[float] = []

    def node_1_dies(line: str) -> None:
        lines.append(line)
        if line == "rank 0 waits for its peer" and not died:
            (pid,) = [int(p.read_text()) for p in (stage_dir(servers[1], state) / ".jobs").glob("*/pid")]
            dead.extend([servers[1].proc.pid, *servers[1].session_pids(), pid])
            if death == "off":
                servers[1].stop()
                for pid_ in dead[1:]:
                    kill_tree(pid_)
            else:
                for pid_ in dead:
                    os.kill(pid_, signal.SIGSTOP)  # the job's children run on (on a frozen node they would not)
            died.append(time.monotonic())

    try:
        with sshd_helper.reachable_only_through_head(servers):
            state = reserved(servers, tmp_path / "results")
            runner = SSHRunner.from_state(state, out=node_1_dies)
            wait = "import time\nprint('rank {} waits for its peer', flush=True)\ntime.sleep(3600)"
            argvs = [[sys.executable, "-c", wait.format(i)] for i in range(2)]
            try:
                with pytest.raises(UserError) as e:
                    runner.run_everywhere(argvs, stage="hang")
                took = time.monotonic() - died[0]
            finally:
                runner.close()
    finally:
        for pid in dead:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                kill_tree(pid)
        for server in servers:
            server.stop()
    with capsys.disabled():  # for the record (-s), never asserted: timings here are noisy
        print(f"\nnode 1 {death}: the stage failed {took:.1f} s after it died (UNREACHABLE_S = "
              f"{multinode.UNREACHABLE_S:.0f} s, STATUS_TIMEOUT_S = {jobs.STATUS_TIMEOUT_S:.0f} s)")
    problem = e.value.problem
    assert problem.startswith(f"stage hang failed on node 1 ({LEASE}-1, {servers[1].user}@127.0.0.1:{servers[1].port} "
                              f"(through 127.0.0.1)) of lease {LEASE}: its node stopped answering over SSH (nothing "
                              f"for {multinode.UNREACHABLE_S:.0f} s while the head answered")
    assert "; its job was stopped on node 0 so that none waits for it" in problem
    assert ("the last lines of node 1's log (nanorepro/work/results/.jobs/hang-" in problem and "on that node) as last "
            "read, before the node stopped answering:\nrank 1 waits for its peer" in problem)
    assert f"see whether {LEASE}-1 is up" in e.value.fix and f"openstack server reboot --hard {LEASE}-1" in e.value.fix
    assert any(line.startswith(f"[hang] node 1 ({LEASE}-1, ") and "does not answer over SSH" in line for line in lines)
    assert any(line.startswith(f"[hang] stopping the job on node 0 ({LEASE}-0, ") for line in lines)
    assert not processes_in([stage_dir(servers[0], state)])  # the head's rank no longer waits
