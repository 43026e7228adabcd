"""One stage on every node of a lease: jobs that stand or fall together, and the node to blame when they fall.

The head's log is streamed; the other nodes' jobs are looked at once per poll without retrying (a node
that died must not hold the watcher for minutes). Once one job has ended the others get PEER_GRACE_S to end
too, none when a node died (its job gone, or the node silent for UNREACHABLE_S while the head answers):
then they are stopped, since their ranks would wait for it for torch's timeouts. Which node is to blame is
decided from every node's final state and log (a rank whose partner died fails too, often first).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import PurePosixPath
from typing import Any

from nanorepro.cloud.jobs import TAIL_LINES, LogStream, job_for, on_each, raise_first
from nanorepro.errors import UserError

SSHRunner = Any  # remote.SSHRunner, which imports this module: its nodes, label, say, jobs, ssh, lease

PEER_GRACE_S = 10.0  # how long the other nodes' jobs may take to end on their own once one node's has ended
UNREACHABLE_S = 30.0  # how long a node may not answer over SSH (while the head does) before it counts as dead
BLAME_LINES = 200  # how much of a failed node's log is searched for a lost peer (torchrun's traceback is ~30 lines)


# What a rank's log says when it failed because a rank on another node went away (gloo's and NCCL's errors,
# torchrun's store): such a node failed after its partner, not because of itself.
PEER_LOST = re.compile(r"connection (reset|closed) by peer|broken pipe|remote (worker|process)|ncclRemoteError|"
                       r"NCCL communicator was aborted|failed to recv, got 0 bytes|DistNetworkError|DistStoreError|"
                       r"Watchdog caught collective operation timeout", re.IGNORECASE)
_DEAD = {"gone": "lost its job (killed, or the node rebooted)", "unreachable": "does not answer over SSH"}


def lost_peer(lines: list[str]) -> bool:
    """Whether these log lines say that a partner rank went away (PEER_LOST)."""
    return any(PEER_LOST.search(line) for line in lines)


@dataclasses.dataclass
class _Watch:
    """What the watcher of a stage on several nodes knows (AllNodes.watch): when each node's job was first
    seen ended, since when each other node has not answered, which nodes it gave up on, which jobs it stopped."""

    ended: dict[int, float] = dataclasses.field(default_factory=dict)
    lost: dict[int, float] = dataclasses.field(default_factory=dict)
    unreachable: set[int] = dataclasses.field(default_factory=set)
    stopped: list[int] = dataclasses.field(default_factory=list)
    tails: dict[int, list[str]] = dataclasses.field(default_factory=dict)  # each other node's log, as last read

    def see(self, states: list[str | int]) -> list[int]:
        """Note when each job was first seen ended; the nodes whose job still runs."""
        now = time.monotonic()
        for i, state in enumerate(states):
            if state != "running":
                self.ended.setdefault(i, now)
        return [i for i, state in enumerate(states) if state == "running"]

    def dead(self, states: list[str | int]) -> list[int]:
        """The nodes whose job cannot end well, first seen first: gone without an exit code (and not stopped
        by the watcher), or not answering."""
        return sorted((i for i, s in enumerate(states) if s in _DEAD and i not in self.stopped),
                      key=self.ended.__getitem__)


class AllNodes:
    """A stage on every node of the head's lease (SSHRunner.run_everywhere), watched until all have ended."""

    def __init__(self, head: "SSHRunner"):
        self.head, self.nodes, self.say = head, head.nodes, head.say

    def run(self, argvs: list[list[str]], *, stage: str, check: bool = True) -> int:
        """argvs[i] as a detached job on node i, started on all nodes at once; the head's log is streamed.
        The jobs stand or fall together: once one has ended, the others get PEER_GRACE_S to end too (none
        when it died: gone, or its node silent for UNREACHABLE_S), then are stopped (a torchrun whose
        partner died would wait on it for torch's timeouts), and the node that caused it fails the stage,
        named with its log's last lines and the lease (_blame). When every node ended with the same exit
        code, that is the stage's (as run_command's).
        A re-run attaches when every node's job still runs; when only some do, those are stopped (they
        cannot meet new partners) and all start again."""
        nodes, cwd = self.nodes, self.head.stage_dir
        jobs = [job_for(argv, stage) for argv in argvs]
        paths = [cwd / job for _, job in jobs]
        states = on_each(nodes, lambda i, node: node.ssh.retrying(stage, lambda: node.jobs.status(paths[i])))
        raise_first(states)
        if "running" in states and set(states) != {"running"}:
            for i in (i for i, state in enumerate(states) if state == "running"):
                self.say(f"[{stage}] stopping what is left of an earlier run on {self.head.label(i)}")
                nodes[i].ssh.retrying(stage, lambda: nodes[i].jobs.kill(paths[i]))
        launched = raise_first(on_each(nodes, lambda i, node: node.jobs.launch(*jobs[i], cwd)))
        if set(launched) == {"running"}:
            self.say(f"[{stage}] already running on all {len(nodes)} nodes: attaching to it")
        else:
            self.say(f"[{stage}] started on {len(nodes)} nodes in {cwd}, the output of {self.head.label(0)} "
                        f"follows (logs: {', '.join(str(p / 'log') for p in paths)})")
        return self.watch(stage, paths, check)
    def watch(self, stage: str, jobs: list[PurePosixPath], check: bool) -> int:
        """Stream the head's log and follow every node's job until all have ended (see run_everywhere).

        A node whose job is gone without an exit code (killed, the node rebooted), or which has not answered
        over SSH for UNREACHABLE_S while the head did, is dead: the other nodes' jobs are stopped at once, as
        their ranks would wait for it for torch's timeouts (NCCL's watchdog: 10 minutes). A job that ended
        with an exit code gives the others PEER_GRACE_S to end too. Which node is to blame is decided from
        every node's final state, not from which was seen first (_blame)."""
        offset, log, watch = 0, LogStream(lambda line: self.say(line)), _Watch()
        reconnects = self.head.ssh.reconnects
        while True:
            data, code, alive = self.head.ssh.retrying(stage, lambda: self.head.jobs.poll(jobs[0], offset))
            offset += len(data)
            if self.head.ssh.reconnects != reconnects:  # the hub lost the head: the others' silence meant nothing
                watch.lost.clear()
                reconnects = self.head.ssh.reconnects
            states: list[str | int] = [code if code is not None else "running" if alive else "gone"]
            states += [self._peer_state(stage, i, jobs[i], watch) for i in range(1, len(jobs))]
            log.feed(data, final=states[0] != "running")
            running = watch.see(states)
            if not running:
                break
            to_stop = [i for i in running if i not in watch.stopped]
            dead = watch.dead(states)
            first = min(watch.ended, key=watch.ended.__getitem__) if watch.ended else None
            if to_stop and dead:
                self._stop(stage, jobs, to_stop, watch, f"{self.head.label(dead[0])} {_DEAD[states[dead[0]]]}")
            elif to_stop and first is not None and time.monotonic() - watch.ended[first] > PEER_GRACE_S:
                failed = [i for i in sorted(watch.ended, key=watch.ended.__getitem__) if states[i] != 0]
                self._stop(stage, jobs, to_stop, watch,
                           f"{self.head.label(failed[0])} failed" if failed else "its partners have ended")
            time.sleep(self.head.poll_s)
        if set(states) == {0} or (not watch.stopped and len(set(states)) == 1 and isinstance(states[0], int)):
            if states[0] and check:  # all ended alike: the stage's own failure, not one node's
                raise UserError(f"stage {stage} failed on all {len(states)} nodes (exit {states[0]}); the last "
                                f"lines of {self.head.label(0)}'s log:\n" + "\n".join(log.tail),
                                f"fix the cause and re-run; the whole logs are {jobs[0] / 'log'} on each node")
            return int(states[0])
        raise self._failure(stage, jobs, states, watch, list(log.tail))
    def _peer_state(self, stage: str, i: int, job: PurePosixPath, watch: "_Watch") -> str | int:
        """Node i's job state, asked once (a node that died must not hold the watcher for RECONNECT_TIMEOUT_S):
        "running" while it may still answer, "unreachable" once it has not for UNREACHABLE_S."""
        import paramiko

        if i in watch.unreachable:
            return "unreachable"
        asked = time.monotonic()  # silence counts from the question: a dead node takes STATUS_TIMEOUT_S to say nothing
        try:
            state, watch.tails[i] = self.nodes[i].jobs.look(job)
        except (paramiko.SSHException, EOFError, OSError) as e:
            now = time.monotonic()
            if i not in watch.lost:
                watch.lost[i] = asked
                self.say(f"[{stage}] {self.head.label(i)} does not answer over SSH ({type(e).__name__}: {e}); its "
                            f"node counts as dead once silent for {UNREACHABLE_S:.0f} s")
            if now - watch.lost[i] < UNREACHABLE_S:
                return "running"  # not known yet
            watch.unreachable.add(i)
            return "unreachable"
        if watch.lost.pop(i, None) is not None:
            self.say(f"[{stage}] {self.head.label(i)} answers again")
        return state
    def _stop(self, stage: str, jobs: list[PurePosixPath], nodes: list[int], watch: "_Watch", why: str) -> None:
        """Stop the jobs on `nodes`; a node that cannot be reached to do so stays to be tried again (and
        counts as dead once it has not answered for UNREACHABLE_S)."""
        import paramiko

        for i in nodes:
            self.say(f"[{stage}] stopping the job on {self.head.label(i)}: {why}")
            try:
                if i == 0:  # the hub's link to the head: retried, as every call to the head is
                    self.head.jobs.kill(jobs[0])
                else:
                    self.nodes[i].jobs.kill(jobs[i], retry=False)
            except (paramiko.SSHException, EOFError, OSError) as e:
                self.say(f"[{stage}] could not reach {self.head.label(i)} to stop its job ({type(e).__name__}: {e})")
                watch.lost.setdefault(i, time.monotonic())
                continue
            watch.stopped.append(i)
    def _blame(self, jobs: list[PurePosixPath], states: list[str | int], watch: "_Watch",
               head_tail: list[str]) -> tuple[list[int], dict[int, int], dict[int, list[str] | None]]:
        """The nodes that caused a failure (first seen first), every failed node's rank, and its log's last
        BLAME_LINES lines (None: unreadable). Ranks, the cause first: 0 its node does not answer, 1 its job
        is gone without an exit code, 2 a non-zero exit whose log does not say a peer was lost, 3 one whose
        log does (a rank whose partner died fails too, often before the partner is seen gone), 4 stopped
        by this watcher."""
        failed = [i for i, s in enumerate(states) if s != 0]
        tails = {i: watch.tails.get(i) if states[i] == "unreachable" else self._tail_of(i, jobs[i], head_tail)
                 for i in failed}

        def rank(i: int) -> int:
            if states[i] == "unreachable":
                return 0
            if i in watch.stopped:
                return 4
            return 1 if states[i] == "gone" else 3 if lost_peer(tails[i] or []) else 2

        ranks = {i: rank(i) for i in failed}
        best = min(ranks.values())
        culprits = sorted((i for i in failed if ranks[i] == best), key=lambda i: watch.ended.get(i, float("inf")))
        return culprits, ranks, tails
    def _tail_of(self, i: int, job: PurePosixPath, head_tail: list[str]) -> list[str] | None:
        """Node i's last BLAME_LINES log lines (the head's streamed tail if its file cannot be read); None
        when node i does not answer."""
        import paramiko

        try:
            if i == 0:
                return self.head.ssh.retrying("log", lambda: self.head.jobs.tail(job, BLAME_LINES, retry=False)) or head_tail
            return self.nodes[i].jobs.tail(job, BLAME_LINES, retry=False)
        except (paramiko.SSHException, EOFError, OSError):
            return head_tail if i == 0 else None
    def _failure(self, stage: str, jobs: list[PurePosixPath], states: list[str | int], watch: "_Watch",
                 head_tail: list[str]) -> UserError:
        """The error for a stage that failed on some nodes: the cause (_blame) and how, what became of the
        others, the cause's last log lines, the lease."""
        culprits, ranks, tails = self._blame(jobs, states, watch, head_tail)

        def how(i: int) -> str:
            return ({0: f"its node stopped answering over SSH (nothing for {UNREACHABLE_S:.0f} s while the head "
                        "answered: it is down, rebooting, or off the network)",
                     1: "it stopped without an exit code (killed, or the node rebooted)",
                     2: f"exit {states[i]}", 3: f"exit {states[i]}, after losing a peer",
                     4: "it did not end with the other nodes' jobs"})[ranks[i]]

        def tail(i: int) -> str:
            where, lines = f"node {i}'s log ({jobs[i] / 'log'} on that node)", tails[i]
            if lines is None:
                return f"\n{where} cannot be read: the node does not answer"
            when = " as last read, before the node stopped answering" if ranks[i] == 0 else ""
            if not lines:
                return f"\n{where} is empty"
            return f"\nthe last lines of {where}{when}:\n" + "\n".join(lines[-TAIL_LINES:])

        others = [i for i in ranks if i not in culprits]
        stopped, after = [i for i in others if ranks[i] == 4], [i for i in others if ranks[i] != 4]
        lease = f" of lease {self.head.lease}" if self.head.lease else ""
        said = {i: next((line for line in reversed(tails[i] or []) if lost_peer([line])), None) for i in after}
        problem = (f"stage {stage} failed on " + "; ".join(f"{self.head.label(i)}{lease}: {how(i)}" for i in culprits)
                   + "".join(f"; node {i}'s job failed after it ({how(i)}"
                             + (f": {said[i].strip()[:300]}" if said[i] else "") + ")" for i in after)
                   + (f"; its job was stopped on {', '.join(f'node {i}' for i in stopped)} so that none waits "
                      "for it" if stopped else "") + "".join(tail(i) for i in culprits))
        down = [i for i in culprits if ranks[i] == 0]
        names = " ".join(self.nodes[i].name for i in down)
        return UserError(problem, (f"see whether {names} is up (the Chameleon dashboard, or `openstack server "
                                   f"show {names}`); reboot it with `openstack server reboot --hard {names}`, or "
                                   "release the lease and reserve again if it does not come back; " if down else "") +
                         "fix the cause (check `uptime` and `dmesg` on a node that stopped) and re-run the stage: it "
                         "starts again on every node, and training resumes from the last checkpoint, which rank 0 "
                         f"wrote on {self.head.label(0)}")
