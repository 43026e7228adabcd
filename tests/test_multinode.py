"""A lease of two nodes, as two loopback sshd "nodes" (tests/sshd.py): node 1 reachable only through the
head, nanorepro installed on both at once and recorded per node, a stage that fails on one node
stopping the other, and the real job script running torchrun over both (gloo on the CPU, one process
and one thread per node) to train `tiny`: the same losses as one process with the same global batch;
a node killed mid-run fails the stage on both, and a re-run resumes from the head's last checkpoint.

Why the losses can match: as in test_distributed.py, every rank walks the same batch stream and takes
its share of each iteration's micro-batches, so 2 ranks x 1 micro-step see exactly the samples one
process x 2 micro-steps sees; only the order of float32 sums differs (the all-reduce). TOL is
test_distributed's bound: measured here, both the 20-step run and the 150-step run killed at about
iter 75 and resumed stay within 1e-5 of one process (exact resume on the CPU, see train.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sshd as sshd_helper
from sshd import alive, processes_in
from test_distributed import assert_close, losses  # the same losses, the same comparison
from nanorepro import chameleon, metrics, remote
from nanorepro.errors import UserError
from nanorepro.pipeline import Pipeline
from nanorepro.remote import SSHRunner

TOL = 1e-4
LEASE = "nanorepro-tester"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(var, None)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two sshd nodes; from this process node 1 can only be reached through node 0."""
    try:
        servers = sshd_helper.start_nodes(tmp_path_factory.mktemp("nodes"), 2)
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
    (state / remote.NODE_FILE).write_text(json.dumps({
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
    return json.loads((state / remote.NODE_FILE).read_text())


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
    known = (state / remote.KNOWN_HOSTS).read_text()  # both host keys pinned, in the one known_hosts
    for server in nodes:
        host_key = (server.dir / "host_ed25519.pub").read_text().split()[1]
        assert f"[127.0.0.1]:{server.port} ssh-ed25519 {host_key}" in known


def test_a_changed_host_key_of_an_inner_node_is_refused(nodes, tmp_path):
    import paramiko

    state = reserved(nodes, tmp_path / "results")
    other = paramiko.Ed25519Key.from_private_key_file(str(nodes[0].key_path))  # any key but node 1's
    (state / remote.KNOWN_HOSTS).write_text(f"[127.0.0.1]:{nodes[1].port} {other.get_name()} {other.get_base64()}\n")
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
    (state / remote.NODE_FILE).write_text(json.dumps(record))
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
    monkeypatch.setattr(remote, "PEER_GRACE_S", 1.0)
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


def test_a_rerun_attaches_to_jobs_running_on_every_node_and_restarts_a_partial_run(installed, fast):
    lines: list[str] = []
    runner = SSHRunner.from_state(installed, out=lines.append)
    code = "import sys, time\nprint('beat', sys.argv[1], flush=True)\ntime.sleep(5)\nprint('done', sys.argv[1], flush=True)"
    argvs = [[sys.executable, "-c", code, str(i)] for i in range(2)]
    try:
        # the kernel that started the jobs died: start them as run_everywhere does, then walk away
        jobs = [node._job(argv, "beat") for node, argv in zip(runner.nodes, argvs)]
        for node, (cmd, job) in zip(runner.nodes, jobs):
            assert node._launch(cmd, job, node.stage_dir) == "started"
        assert runner.run_everywhere(argvs, stage="beat") == 0
        assert "[beat] already running on all 2 nodes: attaching to it" in lines
        assert "done 0" in lines and lines.count("beat 0") <= 1
        # only node 1's job still runs (node 0's ended): it cannot meet a new partner, so it is stopped
        lines.clear()
        node1 = runner.peers[0]
        assert node1._launch(*jobs[1], node1.stage_dir) == "started"
        assert runner.run_everywhere(argvs, stage="beat") == 0
        assert any(line.startswith("[beat] stopping what is left of an earlier run on node 1 (") for line in lines)
        assert any(line.startswith("[beat] started on 2 nodes") for line in lines) and "done 0" in lines
    finally:
        runner.close()


# -- training over both nodes ----------------------------------------------------------------------
def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (what a dying node does to its jobs)."""
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
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
    assert (job / "rc").read_text().strip() == "0"
    assert not (other / "runs" / "ddp" / metrics.METRICS_FILE).exists() and not (other / "runs" / "ddp" / "ckpt.pt").exists()
    reference = one_process(tmp_path / "one", char_data_root, 20, eval_interval=5, eval_iters=3)
    assert_close(losses(installed / "runs" / "ddp"), reference, TOL)


def test_a_killed_node_fails_the_stage_on_both_and_a_rerun_resumes(installed, nodes, fast, shakespeare_path,
                                                                  char_data_root, tmp_path, capsys):
    head, other = (stage_dir(n, installed) for n in nodes)
    run = Pipeline(installed, target="chameleon")
    killed: list[int] = []
    show = run.runner._print

    def kill_node_1(line: str) -> None:  # once node 0 evaluated at iter 50 (after its checkpoint at 25)
        show(line)
        if not killed and line.split("\r")[-1].startswith("step 50:"):
            (job,) = (other / ".jobs").glob("train_long-*")
            assert not (job / "rc").exists(), "node 1's job ended before the test could kill it"
            killed.append(int((job / "pid").read_text()))
            kill_tree(killed[0])

    run.runner._print = kill_node_1
    args = dict(preset="tiny", max_iters=150, overrides=overrides(150, eval_interval=25, eval_iters=1))
    try:
        if not (head / "data").exists():
            run.prepare_data(input_path=str(shakespeare_path), encodings="char")
        with pytest.raises(UserError) as e:
            run.train("long", **args)
        problem = e.value.problem
        assert killed, "the stage ended before the test could kill node 1"
        assert problem.startswith(f"stage train long failed on node 1 ({LEASE}-1, ")
        assert "it stopped without an exit code (killed, or the node rebooted)" in problem
        assert "node 1's log (nanorepro/work/results/.jobs/train_long-" in problem
        assert f"lease {LEASE} (lease-1) at CHI@UC is STILL RUNNING" in problem
        assert "resumes from the last checkpoint" in e.value.fix
        # both nodes' jobs are gone: nothing waits on the dead node
        assert not processes_in([head, other])
        saved = torch.load(head / "runs" / "long" / "ckpt.pt", weights_only=True)["iter_num"]
        assert saved >= 25 and not (other / "runs" / "long" / "ckpt.pt").exists()  # only on the head
        capsys.readouterr()
        run.runner._print = show
        summary = run.train("long", **args)
    finally:
        run.runner.close()
    out = capsys.readouterr().out
    assert f"resuming runs/long from iter {saved} " in out  # node 1 resumed from the head's checkpoint too
    assert summary["status"] == "finished"
    reference = one_process(tmp_path / "one", char_data_root, 150, eval_interval=25, eval_iters=1)
    assert_close(losses(installed / "runs" / "long"), reference, TOL)
