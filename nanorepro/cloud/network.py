"""The private network of a lease of several nodes, made ready for torchrun during setup.

Chameleon's CUDA images run firewalld admitting only SSH (CC-Images' cc-firewall element), so torchrun's
rendezvous on the head (TCP, the record's rdzv_port) and NCCL's and gloo's connections (random ports, both
ways) are refused until the shared network is admitted, and training hangs instead of failing. On every node:

1. the interface that holds the node's private address, and its subnet (`ip -o -4 addr show`);
2. the subnet into firewalld's trusted zone, as Chameleon's network docs say (`firewall-cmd
   --zone=trusted --add-source=<CIDR>`, then `--runtime-to-permanent`, so a reboot keeps it), through
   `sudo -n` unless the SSH user is root; a node without firewall-cmd, or whose firewalld is not running,
   is left as it is, with a note;
3. then the head listens on its rendezvous port for a moment and every node connects to it: a node that
   cannot fails setup, named with the port and what its firewall said.

The interface is also what the stages' NCCL and gloo must use (remote.interface_env): where the host name
resolves to 127.0.1.1, gloo would otherwise bind the loopback. No torch here (the hub imports this).
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from nanorepro.cloud.jobs import on_each
from nanorepro.errors import UserError

if TYPE_CHECKING:
    from nanorepro.cloud.remote import SSHRunner

PORT_CHECK_S = 15.0  # how long each node keeps trying the head's rendezvous port (the listener may start late)
FIREWALLD_NOT_RUNNING = 252  # firewall-cmd's exit code when firewalld is not running (firewall/errors.py)

# Run on the head with the node's venv python: answer on the rendezvous port (every address, as torchrun's
# store does) until `n` nodes have connected or `wait` seconds passed. A port already taken is said, not
# fatal: what listens there still answers the nodes.
LISTEN = """
import socket, sys, time
port, wait, n = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("", port))
except OSError as e:
    print("in use:", e.strerror); sys.exit(0)
s.listen(64)
s.settimeout(0.2)
end, seen = time.monotonic() + wait, 0
while seen < n and time.monotonic() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    with c:
        c.sendall(b"nanorepro\\n")
    seen += 1
print("answered", seen)
"""

# Run on each node: connect to host:port, trying again until `budget` seconds passed (the listener may not
# be up yet); one JSON line: {"ok": true} or the last error (errno 113, "No route to host": a firewall's
# reject; a timeout: one that drops).
CONNECT = """
import json, socket, sys, time
host, port, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + budget
while True:
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(5)
            try:
                ours = s.recv(16).startswith(b"nanorepro")
            except OSError:
                ours = False
        print(json.dumps({"ok": True, "ours": ours})); break
    except OSError as e:
        error = f"{type(e).__name__}: {e.strerror or e}"
        if time.monotonic() > end:
            print(json.dumps({"ok": False, "error": error, "errno": e.errno})); break
        time.sleep(0.5)
"""


# What a failed connection to the head's port says about the network (errno: Linux's).
_MEANING = {113: " (a firewall rejects it: firewalld's default)", 110: " (a firewall drops it)",
            111: " (nothing listens there, or a firewall resets the connection)", None: " (a firewall drops it)"}


def interface_of(ip_output: str, address: str) -> tuple[str, str]:
    """The interface holding `address` in `ip -o -4 addr show` output, and its subnet as a CIDR
    ("eno1", "10.140.80.0/22"); a UserError naming what the node has instead."""
    found = []
    for line in ip_output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2] == "inet":
            name = words[1].split("@")[0].rstrip(":")
            found.append((name, ipaddress.ip_interface(words[3])))
    for name, iface in found:
        if str(iface.ip) == address:
            return name, str(iface.network)
    have = ", ".join(f"{name} {iface}" for name, iface in found) or "none"
    raise UserError(f"no interface holds the private address {address} (IPv4 addresses: {have})",
                    "the record's private_ip must be the node's address on the lease's shared network: re-run "
                    "00_reserve_node, which reads it again from the server")


def find_interface(node: "SSHRunner") -> tuple[str, str]:
    """The interface holding the node's private address, and its subnet."""
    code, out = node.ssh.exec("ip -o -4 addr show")
    if code:
        raise UserError(f"`ip -o -4 addr show` failed on {node.host} (exit {code}): {out.strip()[-500:]}",
                        "install iproute2 on the node (`sudo apt-get install -y iproute2`) and re-run 00_reserve_node "
                        "(it reuses the lease and servers)")
    return interface_of(out, node.private_ip)


def open_firewall(node: "SSHRunner", cidr: str) -> str:
    """Admit `cidr` in the node's firewalld (trusted zone, runtime and permanent); what was done, in words.
    No firewall-cmd, or firewalld not running: nothing to open (the port check will tell if something else
    filters). Any other failure (sudo wants a password, firewalld refuses): a UserError with the commands."""
    if node.ssh.exec("command -v firewall-cmd >/dev/null 2>&1")[0]:
        return "no firewall-cmd on the node: nothing opened"
    fw = "firewall-cmd" if node.ssh.exec("id -u")[1].strip() == "0" else "sudo -n firewall-cmd"  # never a prompt
    by_hand = (f"on {node.name}, run `sudo firewall-cmd --zone=trusted --add-source={cidr}` and `sudo firewall-cmd "
               "--runtime-to-permanent`, then re-run 00_reserve_node (it reuses the lease and servers)")

    def run(args: str) -> tuple[int, str]:
        return node.ssh.exec(f"{fw} {args}")

    code, out = run("--state")
    if code == FIREWALLD_NOT_RUNNING:
        return "firewalld is not running: nothing opened"
    if code:
        raise UserError(f"`{fw} --state` failed on {node.host} (exit {code}): {out.strip()[-500:]}", by_hand)
    code, out = run(f"--zone=trusted --add-source={shlex.quote(cidr)}")
    if code:
        raise UserError(f"`{fw} --zone=trusted --add-source={cidr}` failed on {node.host} (exit {code}): "
                        f"{out.strip()[-500:]}", by_hand)
    already = "ZONE_ALREADY_SET" in out
    kept, saved = run("--runtime-to-permanent")  # as Chameleon's docs say; not fatal: this boot is open anyway
    code, sources = run("--zone=trusted --list-sources")
    if code or cidr not in sources.split():
        raise UserError(f"firewalld on {node.host} does not list {cidr} in its trusted zone after admitting it "
                        f"(`{fw} --zone=trusted --list-sources`: {sources.strip()[-300:] or 'nothing'})", by_hand)
    done = f"firewalld's trusted zone {'already admitted' if already else 'now admits'} {cidr}"
    return done + (" (kept across reboots)" if kept == 0 else
                   f" (for this boot only: --runtime-to-permanent failed: {saved.strip()[-200:]})")


def port_check(head: "SSHRunner") -> tuple[list[str | None], str]:
    """From every node, connect to the head's rendezvous port while the head listens on it: each node's
    error (None: it answered), and what the listener said."""
    nodes, host, port = head.nodes, head.private_ip, head.rdzv_port

    def python(node: "SSHRunner") -> str:  # the venv setup made: it is there on every node
        return f"{shlex.quote(str(node.remote_dir))}/.venv/bin/python"

    def connect(i: int, node: "SSHRunner") -> str | None:
        code, out = node.ssh.exec(f"{python(node)} -c {shlex.quote(CONNECT)} {shlex.quote(host)} {port} "
                                  f"{PORT_CHECK_S}")
        try:
            result = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return f"the check could not run (exit {code}): {out.strip()[-300:]}"
        if result.get("ok"):
            return None
        return str(result.get("error")) + _MEANING.get(result.get("errno"), "")

    with ThreadPoolExecutor(max_workers=1) as pool:
        listener = pool.submit(head.ssh.exec, f"{python(head)} -c {shlex.quote(LISTEN)} {port} {PORT_CHECK_S + 5} "
                                              f"{len(nodes)}")
        time.sleep(0.5)  # the listener's head start; a late one is waited for by each node
        errors = [e if e is None or isinstance(e, str) else f"{type(e).__name__}: {e}"
                  for e in on_each(nodes, connect)]
        try:
            said = listener.result()[1].strip()
        except Exception as e:  # noqa: BLE001 - reported with the nodes' errors, which say more
            said = f"{type(e).__name__}: {e}"
    return errors, said


def prepare(head: "SSHRunner") -> list[dict[str, Any]]:
    """Steps 1-3 of the module doc on every node of the lease (head first); each node's network facts for
    the record ("iface", "cidr", "firewall"), or a UserError naming each node that failed and why."""
    def one(i: int, node: "SSHRunner") -> dict[str, Any]:
        iface, cidr = find_interface(node)
        try:
            firewall: str | UserError = open_firewall(node, cidr)
            node.say(f"private network {cidr} on {iface}; {firewall}")
        except UserError as e:  # the port check still runs: it says what the failure means
            firewall = e
        return {"iface": iface, "cidr": cidr, "firewall": firewall}

    results = on_each(head.nodes, one)
    failed = {i: r if isinstance(r, BaseException) else r["firewall"] for i, r in enumerate(results)
              if isinstance(r, BaseException) or isinstance(r["firewall"], UserError)}
    problems = [f"{head.label(i)}: {e.problem if isinstance(e, UserError) else f'{type(e).__name__}: {e}'}"
                for i, e in failed.items()]
    fixes = [e.fix for e in failed.values() if isinstance(e, UserError)]
    if all(isinstance(r, dict) for r in results):  # every node's address found: the port check can run
        errors, said = port_check(head)
        head_fw = results[0]["firewall"] if 0 not in failed else None
        for i, error in enumerate(errors):
            if error:
                problems.append(f"{head.label(i)} cannot reach the head's rendezvous port {head.private_ip}:"
                                f"{head.rdzv_port} (TCP): {error}"
                                + (f"; the head's firewall: {head_fw}" if head_fw else "")
                                + ("" if said.startswith("answered") else f"; the head's listener said: {said}"))
        if any(errors):
            fixes.append("admit the private network in the nodes' firewalls (the head's TCP port "
                         f"{head.rdzv_port}, and the ports NCCL and gloo pick, both ways): with firewalld, `sudo "
                         "firewall-cmd --zone=trusted "
                         f"--add-source={results[0]['cidr']}` and `sudo firewall-cmd --runtime-to-permanent` on each "
                         "node, then re-run 00_reserve_node (it reuses the lease and servers)")
        elif said.startswith("in use"):
            head.say(f"note: port {head.rdzv_port} is in use on the head ({said}): a training still running there?")
    if problems:
        raise UserError("the nodes cannot train together: " + "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    head.say(f"the head's rendezvous port {head.private_ip}:{head.rdzv_port} answers every node")
    return results
