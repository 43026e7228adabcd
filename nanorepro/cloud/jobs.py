"""Stages run on a node as detached jobs that outlive the SSH connection and the hub's kernel.

A job runs under `setsid nohup` in its folder `.jobs/<stage>-<hash>/` (relative to the stage folder),
writing `log`, its `pid` and boot id, and, when it ends, `rc` (by rename, so a reader never sees half
of it). `NodeJobs` starts one (or attaches to the same job still running), follows its log as it grows,
and asks its state, its log's end, or stops it with its whole process tree. A pid recorded before a
reboot means nothing: the boot id must match too.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any, Callable

from nanorepro.cloud.ssh import Connection, quote, read_file
from nanorepro.config import ON_GPU_NODE
from nanorepro.errors import UserError

JOBS = ".jobs"
TAIL_LINES = 20
STATUS_TIMEOUT_S = 15.0  # one look at a job on a node that may have died: a dead one never answers
BOOT_ID = "/proc/sys/kernel/random/boot_id"  # new at every boot: a pid from before a reboot means nothing


def _same_boot(boot_file: str) -> str:
    """A shell test: the boot id a job recorded (a quoted path) is this boot's, or none was recorded."""
    return f'{{ [ ! -s {boot_file} ] || [ "$(cat {boot_file})" = "$(cat {BOOT_ID} 2>/dev/null)" ]; }}'


# How a stage starts on the node (sent over SSH, run by sh in the remote home). Placeholders are
# shell-quoted paths relative to the stage folder {cwd}; {cmd} is the quoted command line.
JOB_SCRIPT = """\
mkdir -p -- {cwd} && cd -- {cwd} || exit 97
# The same job still runs (pid alive, recorded in this boot, no exit code yet): attach to it instead.
if [ -f {pid} ] && [ ! -f {rc} ] && kill -0 "$(cat {pid})" 2>/dev/null && {same_boot}; then echo running; exit 0; fi
rm -rf -- {job}; mkdir -p -- {job}
# The job's own script, kept in its folder: it records its boot and pid, runs the command, then
# writes the exit code by rename, so a reader never sees half of it.
cat > {job}/run.sh <<'{end}'
cat {boot_id} > {boot} 2>/dev/null
echo $$ > {pid}
export PYTHONUNBUFFERED=1 {on_gpu_node}=1
{cmd}
echo $? > {rc}.tmp && mv {rc}.tmp {rc}
{end}
# setsid nohup: the job outlives this SSH session and the hub's kernel. Alone on its line (not in an
# &&-list, which would hold the SSH channel open until the job ends).
setsid nohup sh {job}/run.sh > {log} 2>&1 < /dev/null &
# Wait for the pid file, so that a job without one later is known to be gone (see NodeJobs.follow).
i=0; while [ ! -s {pid} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo started
"""


# A job's state, as one word: "rc <code>", running, or gone (rc read again after the pid: it may have
# ended in between).
STATUS_SCRIPT = """\
if [ -f {rc} ]; then echo "rc $(cat {rc})"
elif [ -s {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null && {same_boot}; then echo running
elif [ -f {rc} ]; then echo "rc $(cat {rc})"
else echo gone; fi
"""

# The job's state and the end of its log (its last 4 KB: a progress bar redrawn with \r and no newline for days
# makes one line of many MB), for a watcher that must still have something to show once the node has died.
LOOK_SCRIPT = STATUS_SCRIPT + "echo '--- log'; tail -c 4096 -- {log} 2>/dev/null; true\n"

# Stop a job and its process tree: TERM, then KILL what is left after 5 s. The tree, not the job's
# process group: torchrun starts its workers in sessions of their own.
KILL_SCRIPT = """\
p=$(cat {pid} 2>/dev/null)
[ -n "$p" ] && [ ! -f {rc} ] && {same_boot} || exit 0
tree() {{ for c in $(ps -o pid= --ppid "$1"); do tree "$c"; done; echo "$1"; }}
pids=$(tree "$p")
kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt 50 ]; do
  left=; for q in $pids; do kill -0 "$q" 2>/dev/null && left=1; done
  [ -z "$left" ] && exit 0
  sleep 0.1; i=$((i+1))
done
kill -KILL $pids 2>/dev/null
exit 0
"""


def _state(out: str) -> str | int:
    """STATUS_SCRIPT's answer as a job state: its exit code, "running" or "gone"."""
    words = out.split()
    if words[:1] == ["rc"]:
        return int(words[1]) if len(words) > 1 and words[1].lstrip("-").isdigit() else 1
    return "running" if words == ["running"] else "gone"


class LogStream:
    """A job's log as it grows: whole lines printed as they arrive (a progress bar's \\r kept, so the
    notebook redraws it in place), the last TAIL_LINES kept for error messages."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.pending = say, b""
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def feed(self, data: bytes, final: bool = False) -> None:
        """Print the complete lines of what arrived; with `final`, the rest too."""
        self.pending += data
        complete, sep, rest = (self.pending, b"\n", b"") if final else self.pending.rpartition(b"\n")
        self.pending = rest
        text = complete.decode("utf-8", "replace") if sep else ""
        for line in (text[:-1] if text.endswith("\n") else text).split("\n") if text else []:
            self.say(line)
            self.tail.append(line.rstrip("\r").split("\r")[-1])  # a progress bar's last state


def on_each(nodes: list[Any], fn: Callable[[int, Any], Any]) -> list[Any]:
    """fn(i, node) for every node at once, one thread each; the results in node order, a failure as
    its exception (so that one node's failure never hides how the others did)."""
    if len(nodes) == 1:
        try:
            return [fn(0, nodes[0])]
        except Exception as e:  # noqa: BLE001 - handed back as the node's result
            return [e]
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = [pool.submit(fn, i, node) for i, node in enumerate(nodes)]
        return [f.exception() or f.result() for f in futures]


def raise_first(results: list[Any]) -> list[Any]:
    """The results, or the first one that is an exception, raised."""
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def remote_env() -> list[str]:
    """`env K=V ...` for stages on the node, from $NANOREPRO_REMOTE_ENV ("K=V K2=V2"): settings a node
    needs that this machine's environment should not leak there wholesale (e.g. HF_HOME on a big disk)."""
    pairs = shlex.split(os.environ.get("NANOREPRO_REMOTE_ENV", ""))
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0].isidentifier()]
    if bad:
        raise UserError(f"NANOREPRO_REMOTE_ENV has entries that are not NAME=VALUE: {bad}",
                        "write it as NAME=VALUE pairs separated by spaces")
    return ["env", *pairs] if pairs else []


def job_for(argv: list[str], stage: str) -> tuple[str, PurePosixPath]:
    """The shell command for argv and its job folder (relative to the stage folder): one per command."""
    cmd = " ".join(quote(a) for a in [*remote_env(), *argv])
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in stage)[:40]
    return cmd, PurePosixPath(JOBS) / f"{slug}-{hashlib.sha1(cmd.encode()).hexdigest()[:8]}"


class NodeJobs:
    """The jobs on one node, over its connection: start or attach, follow, state, log, stop."""

    def __init__(self, ssh: Connection, say: Callable[[str], None], poll_s: float):
        self.ssh, self.say, self.poll_s = ssh, say, poll_s

    def launch(self, cmd: str, job: PurePosixPath, cwd: PurePosixPath) -> str:
        """Start the job unless the same one still runs ("running"); safe to repeat after a dropped connection."""
        end = "NANOREPRO_JOB_" + hashlib.sha1(cmd.encode()).hexdigest()[:12]  # never a line of the quoted cmd
        script = JOB_SCRIPT.format(cwd=quote(cwd), job=quote(job), pid=quote(job / "pid"), rc=quote(job / "rc"),
                                   boot=quote(job / "boot"), log=quote(job / "log"), boot_id=BOOT_ID, cmd=cmd, end=end, on_gpu_node=ON_GPU_NODE,
                                   same_boot=_same_boot(quote(job / "boot")))
        return self.ssh.check(script, "starting the job").strip()
    def follow(self, stage: str, job: PurePosixPath) -> tuple[int, list[str]]:
        """Stream the job's log until its exit code appears; reconnect on drops."""
        offset, log = 0, LogStream(lambda line: self.say(line))
        while True:
            data, code, alive = self.ssh.retrying(stage, lambda: self.poll(job, offset))
            offset += len(data)
            log.feed(data, final=code is not None or not alive)
            if code is not None:
                return code, list(log.tail)
            if not alive:
                raise UserError(f"stage {stage} on {self.ssh.host} stopped without an exit code (killed, or the node "
                                "rebooted); the last lines of its log:\n" + "\n".join(log.tail),
                                "re-run the stage (training resumes from its last checkpoint); check `uptime` and "
                                "`dmesg` on the node if it happens again")
            time.sleep(self.poll_s)
    def status(self, job: PurePosixPath, retry: bool = True) -> str | int:
        """The job's exit code, "running", or "gone" (no exit code and no live process: killed, the node
        rebooted, or never started). Without `retry`, a dropped connection raises (Connection.once)."""
        out = self.ssh.check(STATUS_SCRIPT.format(rc=quote(job / "rc"), pid=quote(job / "pid"),
                                                  same_boot=_same_boot(quote(job / "boot"))), "checking a job",
                             retry=retry, timeout=120.0 if retry else STATUS_TIMEOUT_S)
        return _state(out)
    def look(self, job: PurePosixPath) -> tuple[str | int, list[str]]:
        """The job's state (as _status) and its log's last lines, asked once (Connection.once)."""
        out = self.ssh.check(LOOK_SCRIPT.format(rc=quote(job / "rc"), pid=quote(job / "pid"), log=quote(job / "log"),
                                                same_boot=_same_boot(quote(job / "boot"))), "checking a job",
                             retry=False, timeout=STATUS_TIMEOUT_S)
        status, _, log = out.partition("\n--- log\n")
        lines = [line.rstrip("\r").split("\r")[-1] for line in log.splitlines()]
        return _state(status), lines[-TAIL_LINES:]
    def kill(self, job: PurePosixPath, retry: bool = True) -> None:
        """Stop the job and everything it started (torchrun runs its workers in sessions of their own)."""
        self.ssh.check(KILL_SCRIPT.format(rc=quote(job / "rc"), pid=quote(job / "pid"),
                                          same_boot=_same_boot(quote(job / "boot"))), "stopping a job", retry=retry)
    def tail(self, job: PurePosixPath, lines: int = TAIL_LINES, retry: bool = True) -> list[str]:
        """The last lines of the job's log (a progress bar's last state for its line)."""
        out = self.ssh.exec(f"tail -n {int(lines)} -- {quote(job / 'log')} 2>/dev/null", retry=retry,
                            timeout=120.0 if retry else STATUS_TIMEOUT_S)[1]
        return [line.rstrip("\r").split("\r")[-1] for line in out.splitlines()]
    def poll(self, job: PurePosixPath, offset: int) -> tuple[bytes, int | None, bool]:
        """The job's new log bytes from `offset`, its exit code (None while it runs), and whether it is alive."""
        sftp = self.ssh.sftp()
        rc = read_file(sftp, job / "rc")
        data = read_file(sftp, job / "log", offset) or b""  # after rc: once rc exists, the log is complete
        if rc is not None:
            return data, int(rc.decode().strip() or "1"), True
        pid = (read_file(sftp, job / "pid") or b"").decode().strip()  # none: _launch waited for it, the folder was wiped
        # a pid from before a reboot may belong to another process now: the boot id must match too
        alive = bool(pid) and self.ssh.exec(f"[ -f {quote(job / 'rc')} ] || {{ kill -0 {quote(pid)} 2>/dev/null && "
                                            f"{_same_boot(quote(job / 'boot'))}; }}")[0] == 0
        return data, None, alive
