"""Reserve A100 bare-metal nodes on Chameleon with python-chi, and give them back.

`reserve(nodes=N)`: credentials and site, node type and availability (N free hosts of one type),
image and key checks, then ONE lease for N hosts (reused by name), ACTIVE, N servers on it named
`<lease>-0..N-1` (reused by name), one floating IP on the head (node 0), and SSH answering there.
The other nodes get no public address: they are reached through the head over the private network.
The node record `<state_dir>/chameleon_node.json` is rewritten after every step, so `release()` always
knows what to delete, and a failure after the lease exists never leaves it running unannounced:
it is released, or the message says it still runs, until when, and the command that releases it.
`release()`: every server, the floating IP, the lease; then it checks that nothing is left.

The record keeps the head's `host` (floating IP), `port`, `server_name`, `server_id` as for one node,
and `nodes`: [{"name", "server_id", "private_ip", "ssh_port"}, ...], head first, one entry per node
(present for one node too; entries are written with the names before the servers exist).

python-chi 1.2.10's quirks are handled where each bites. Its `Lease.wait()`/`Server.wait()` return
normally on ERROR and its `.status` properties call the API on every read: we poll the clients ourselves.
Light module (the hub kernel imports it): no torch, and python-chi is imported only when used.

Knobs for unusual setups and tests, as environment variables: NANOREPRO_CHI_POLL_S (seconds between
status polls, default 10), NANOREPRO_SSH_USER (cc), NANOREPRO_SSH_PORT (22; or one port per node,
comma-separated, head first: the tests' loopback sshds), NANOREPRO_REMOTE_DIR (nanorepro, under the
user's home on the node).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import re
import shlex
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from nanorepro.cloud import nodeinstall
from nanorepro.cloud.jobs import on_each
from nanorepro.cloud.network import prepare as prepare_network
from nanorepro.cloud.node import NODE_FILE, NodeEntry, NodeRecord
from nanorepro.cloud.poll import poll_until
from nanorepro.cloud.remote import SSHRunner
from nanorepro.cloud.runner import TARGETS, resolve_target, results_path
from nanorepro.cloud.ssh import KNOWN_HOSTS, check_key_file
from nanorepro.errors import UserError
from nanorepro.fmt import duration

# The A100 node types on Chameleon's bare-metal sites (the sites that have them, the GPUs of one node), in the
# order "auto" tries them; from Chameleon's hardware pages (technical/baremetal/composable_hardware, 2026-07).
# TACC's compute_gigaio is not here: its six nodes share four composable GPUs (two A100 40 GB, two A30), so a
# node there may have an A30, or no GPU at all.
A100_NODE_TYPES: dict[str, tuple[tuple[str, ...], str]] = {
    "compute_gigaio": (("CHI@UC",), "1x A100 80 GB"),
    "gpu_a100_pcie": (("CHI@UC",), "4x A100 PCIe"),
    "gpu_a100_nvlink": (("CHI@UC",), "4x A100 NVLink"),
    "compute_liqid": (("CHI@TACC",), "1-2x A100 40 GB"),
}
# Where those node types exist without a sure A100: a user may still name them (the GPU is checked after boot)
ALSO_AT: dict[str, tuple[str, ...]] = {"compute_gigaio": ("CHI@TACC",)}
EXPECTED_GPU = "A100"  # what the presets' published figures ran on: nvidia-smi -L must show it
DEFAULT_IMAGE = nodeinstall.CUDA_IMAGE  # Python 3.12; 22.04 has 3.10, below requires-python
NETWORK = "sharednet1"
MAX_LEASE_HOURS = 7 * 24  # Chameleon caps leases at 7 days
DEFAULT_LEASE_HOURS = 4  # the reproduction on an A100, boot and install included, with time to spare
LEASE_TIMEOUT_S, SERVER_TIMEOUT_S, RELEASE_TIMEOUT_S = 15 * 60, 40 * 60, 10 * 60
STATE_DIR = "results/chameleon"  # where the node record goes unless a results folder is given
# Chameleon charges a lease in service units (SU): node-hours times the node type's rate. Its published
# rates (SU per node-hour): base bare metal 1, a node with one A100 4, a node with four A100s 16.
SU_RATES_SOURCE = ("Chameleon's published rates: changelog of 2025-09-03 (blog.chameleoncloud.org) and the FAQ "
                   "'What are the units of an allocation'")
SU_RATES: dict[str, float] = {"compute_gigaio": 4.0, "compute_liqid": 4.0, "gpu_a100_pcie": 16.0,
                              "gpu_a100_nvlink": 16.0}
SU_BASE_RATE = 1.0  # a node type not in SU_RATES: assumed at the base rate, and said so
# Blazar's lease states: a lease in one of REUSABLE is reused by name; LIVE ones hold (or may hold) a node or
# are on their way out (TERMINATING, DELETING): "nothing left" means none of these.
REUSABLE = ("CREATING", "PENDING", "STARTING", "ACTIVE", "UPDATING", "ERROR")
LIVE = (*REUSABLE, "TERMINATING", "DELETING")


# -- small helpers ----------------------------------------------------------------------------
def _poll_s() -> float:
    return float(os.environ.get("NANOREPRO_CHI_POLL_S", "10"))


@contextlib.contextmanager
def _step(title: str) -> Iterator[None]:
    """Say what is being done and how long it took."""
    print(f"-> {title} ...", flush=True)
    started = time.monotonic()
    yield
    print(f"   done in {duration(time.monotonic() - started)}", flush=True)


def _on_chameleon(target: str, local_note: str) -> bool:
    """True for target 'chameleon' ('auto' on Chameleon's JupyterHub); False, after saying why nothing is
    done, for 'local' ('auto' elsewhere)."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}", "use target='auto', 'local' or 'chameleon'")
    if resolve_target(target) == "local":
        why = "target is 'local'" if target == "local" else "target is 'auto' and this is not Chameleon's JupyterHub"
        print(f"{why}: {local_note}")
        return False
    return True


def _state_dir(state_dir: str | Path | None) -> Path:
    """The folder of the node record: as given, or results/chameleon in the checkout (the notebooks' default)."""
    return Path(state_dir) if state_dir else results_path(None, "chameleon")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _parse_blazar(value: str) -> dt.datetime:
    """Blazar's dates ("2026-11-25T14:00:00.000000", UTC without a zone)."""
    return dt.datetime.fromisoformat(value).replace(tzinfo=dt.timezone.utc)


def _when(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def su_rate(node_type: str | None) -> tuple[float, str]:
    """(SU per node-hour, where that rate comes from) of a node type."""
    if node_type in SU_RATES:
        return SU_RATES[node_type], f"{node_type}'s rate, {SU_RATES_SOURCE}"
    return SU_BASE_RATE, (f"assumed: {node_type or 'this node type'} has no published rate, so the base bare-metal "
                          "rate; GPU nodes are charged more (check Chameleon's FAQ)")


def su_cost(hours: float, nodes: int = 1, node_type: str | None = None) -> float:
    """Service units a lease of `nodes` nodes of `node_type` costs: node-hours times the type's rate."""
    return hours * nodes * su_rate(node_type)[0]


def check_nodes(nodes: Any) -> int:
    """`nodes` as a node count, or a UserError naming the fix."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UserError(f"nodes={nodes!r} is not a positive whole number of nodes",
                        "set nodes=1 for one node, or e.g. nodes=2 for two (each gpu_a100_pcie node has 4 A100s)")
    return nodes


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ssh_ports(nodes: int) -> list[int]:
    """Each node's SSH port: 22, or $NANOREPRO_SSH_PORT (one port for all, or one per node, head first)."""
    raw = os.environ.get("NANOREPRO_SSH_PORT", "22")
    try:
        ports = [int(p) for p in raw.split(",")]
    except ValueError:
        ports = []
    if len(ports) == 1:
        ports *= nodes
    if len(ports) != nodes:
        raise UserError(f"NANOREPRO_SSH_PORT={raw!r} does not give one port for each of the {nodes} nodes",
                        "unset it (22 on Chameleon), or give one port, or one per node separated by commas")
    return ports


def release_command(state_dir: Path) -> str:
    """A command that releases the lease wherever this checkout is, the hub included (which installs nothing:
    there is no `nanorepro` command there, but the package runs from the project folder)."""
    root = Path(__file__).resolve().parents[2]
    return f"cd {shlex.quote(str(root))} && python3 -m nanorepro release --results-dir {shlex.quote(str(state_dir))}"


def still_running(record: NodeRecord, state_dir: Path) -> str:
    """The plain statement that a lease still runs, until when, and how to release it: notebook 05 first
    (what a hub user has at hand), then a terminal command that works on the hub too."""
    left = ""
    if record.lease_end:
        end = dt.datetime.fromisoformat(record.lease_end)
        hours = max((end - _utcnow()).total_seconds() / 3600, 0)
        count = len(record.nodes or [None])
        left = f" until {_when(end)} ({hours:.1f} h more, about {su_cost(hours, count, record.node_type):.0f} SU)"
    return (f"lease {record.lease_name} ({record.lease_id}) at {record.site} is STILL RUNNING"
            f"{left}; release it with notebooks/05_release_node.ipynb (target='chameleon', "
            f"results_dir={str(state_dir)!r}), or in a terminal: `{release_command(state_dir)}`")


# -- connecting ---------------------------------------------------------------------------------
def _import_chi() -> Any:
    try:
        import chi
        import chi.hardware
        import chi.image
        import chi.lease
        import chi.network
        import chi.server
    except ImportError as e:
        raise UserError(f"python-chi is not installed ({e})", "pip install -e '.[chameleon]'") from e
    # neutronclient warns on every client it makes (python-chi makes one per call)
    logging.getLogger("neutronclient.v2_0.client").setLevel(logging.ERROR)
    return chi


def _use_site(chi: Any, site: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints four lines; we say it in one
        chi.use_site(site)


def connect(site: str | None, project: str | None = None) -> tuple[Any, str]:
    """python-chi pointed at `site` (default $OS_REGION_NAME) and `project` with working credentials:
    the chi module, and the site."""
    env = os.environ
    if not any(env.get(v) for v in ("OS_ACCESS_TOKEN", "OS_APPLICATION_CREDENTIAL_ID", "OS_TOKEN", "OS_PASSWORD")):
        raise UserError("no Chameleon credentials in this environment (none of OS_ACCESS_TOKEN, "
                        "OS_APPLICATION_CREDENTIAL_ID, OS_TOKEN, OS_PASSWORD is set)",
                        "run on the Chameleon JupyterHub, or `source` an application-credential openrc "
                        "(created 'unrestricted', or Blazar refuses leases) before starting Jupyter")
    app_cred = env.get("OS_AUTH_TYPE", "").startswith("v3applicationcredential")
    env_id = env.get("OS_PROJECT_ID")
    if project and env_id and project != env_id:  # keystone scopes by id before name
        print(f"   warning: OS_PROJECT_ID={env_id} is set in this environment and decides the project charged, not "
              f"project={project!r}; to charge {project}, unset it (in the notebook: "
              "`import os; os.environ.pop('OS_PROJECT_ID')`) and run this again", flush=True)
    project = project or env.get("OS_PROJECT_NAME") or env_id
    if not project and not app_cred:
        raise UserError("no Chameleon project chosen",
                        "set project='CHI-XXXXXX' in the parameters cell, or export OS_PROJECT_NAME")
    site = site or env.get("OS_REGION_NAME")
    if not site:
        raise UserError("no Chameleon site chosen", "set site='CHI@UC' (or 'CHI@TACC') in the parameters cell")
    chi = _import_chi()
    from chi import context

    # python-chi reads the environment once, at import: read it again, so that credentials or a project
    # changed since (e.g. OS_PROJECT_ID popped, as the warning above says) take effect on this run
    context.reset()
    try:
        sites = context.list_sites()  # chi.use_site() would only print on failure
    except Exception as e:
        raise UserError(f"cannot fetch Chameleon's list of sites from {context.RESOURCE_API_URL} ({e})",
                        "check this machine reaches the internet, and retry in a minute") from e
    if site not in sites:
        raise UserError(f"unknown Chameleon site {site!r}",
                        f"use one of: {', '.join(s for s in sites if s.startswith('CHI@'))}")
    _use_site(chi, site)
    if project and not app_cred:
        chi.set("project_name", project)
    try:
        project_id = chi.session().get_project_id()
    except Exception as e:
        raise UserError(f"Chameleon at {site} refused the credentials or could not be reached "
                        f"({type(e).__name__}: {e})",
                        "on the hub restart your server to refresh the token; with an openrc check it is "
                        "for this project and not expired") from e
    print(f"   site {site}, project {project or project_id}", flush=True)
    return chi, site


# -- availability -------------------------------------------------------------------------------
def availability(chi: Any, node_type: str, hours: float, nodes: int = 1) -> dict[str, Any]:
    """How many `node_type` nodes the current site has, how many are free for `hours` from now, and
    when `nodes` of them are next free together (None when unknown, or the site has fewer)."""
    from chi.exception import CHIValueError

    try:
        hosts = chi.hardware.get_nodes(node_type=node_type)
    except CHIValueError:
        return {"node_type": node_type, "nodes": 0, "free_now": 0, "next_free": None}
    soon = _utcnow() + dt.timedelta(minutes=5)
    slot_hours = max(1, math.ceil(hours))
    starts = sorted(host.next_free_timeslot(minimum_hours=slot_hours)[0] for host in hosts if host.reservable)
    return {"node_type": node_type, "nodes": len(hosts), "free_now": sum(s <= soon for s in starts),
            "next_free": starts[nodes - 1] if len(starts) >= nodes else None}


def _other_sites(chi: Any, site: str, hours: float) -> list[str]:
    """'site=..., node_type=... (N free now)' for A100 types at other sites (best effort; the site is restored)."""
    found = []
    for node_type, (sites, _) in A100_NODE_TYPES.items():
        for other in sites:
            if other == site:
                continue
            hint = f"site='{other}', node_type='{node_type}'"
            try:
                _use_site(chi, other)
                hint += f" ({availability(chi, node_type, hours)['free_now']} free now)"
            except Exception:
                pass  # the hint without the count
            finally:
                _use_site(chi, site)
            found.append(hint)
    return found


def choose_node_type(chi: Any, site: str, node_type: str, hours: float, nodes: int = 1) -> str:
    """The A100 node type to lease: `node_type`, or for "auto" the first of which `site` has `nodes` free."""
    here = [t for t, (sites, _) in A100_NODE_TYPES.items() if site in sites]
    if node_type == "auto" and not here:
        raise UserError(f"{site} has no node type with a sure A100", "use site='CHI@UC' or site='CHI@TACC'")
    if node_type != "auto":
        choose_node_type_name(site, node_type, here)
    if node_type != "auto" and node_type not in here:  # the user's choice runs; the GPU is checked after boot
        print(f"   note: {node_type} at {site} is not one of the node types with a sure A100 here "
              f"({', '.join(here) or 'none'}): its GPU is checked after boot and named in the record and the "
              "report, and the published A100 figures may not apply", flush=True)
    candidates = here if node_type == "auto" else [node_type]
    seen = []
    for t in candidates:
        try:
            info = availability(chi, t, hours, nodes)
        except Exception as e:  # the hardware API is a convenience: Blazar has the last word
            print(f"   could not check availability of {t} ({type(e).__name__}: {e}); asking for a lease anyway")
            return t
        print(f"   {t} at {site}: {info['nodes']} nodes, {info['free_now']} free for {hours:g} h", flush=True)
        if info["free_now"] >= nodes:
            return t
        seen.append(info)
    nexts = [f"{i['node_type']} from {_when(i['next_free'])}" for i in seen if i["next_free"]]
    others = _other_sites(chi, site, hours)
    where = f"at {site} for {hours:g} h" + (f"; next free: {', '.join(nexts)}" if nexts else "")
    fix = ("book the first free window with start='next_free' (00 then stops; run it again after the start), or "
           "re-run later" + (f", or try {'; or '.join(others)}" if others else "") + ", or ask for fewer lease_hours")
    if nodes == 1:
        raise UserError(f"no A100 node ({', '.join(candidates)}) is free {where}", fix)
    small = [f"{i['node_type']} has {i['nodes']} in all" for i in seen if i["nodes"] < nodes]
    raise UserError(f"fewer than {nodes} A100 nodes of one type ({', '.join(candidates)}) are free {where}" +
                    (f" ({site}: {', '.join(small)})" if small else ""), f"{fix} or fewer nodes")


def parse_start(start: str) -> str | dt.datetime:
    """"now", "next_free", or the aware UTC time an ISO `start` names (refused when it is past)."""
    if start in ("now", "next_free"):
        return start
    try:
        when = dt.datetime.fromisoformat(str(start))
    except ValueError as e:
        raise UserError(f"start={start!r} is not 'now', 'next_free' or an ISO time",
                        "e.g. start='next_free', or start='2026-12-24T09:00' (UTC)") from e
    when = when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)
    if when < _utcnow():
        raise UserError(f"start={start!r} is in the past", "use start='now', or a time to come")
    return when


def choose_window(chi: Any, site: str, node_type: str, hours: float, nodes: int,
                  at: dt.datetime | None) -> tuple[str, dt.datetime | None]:
    """(node type, start) of a lease booked ahead: at `at`, or (None) at the earliest time `nodes` hosts of a
    matching type are free for `hours` (Blazar's allocations, as availability() reads them). A start within
    a few minutes is now (None)."""
    here = [t for t, (sites, _) in A100_NODE_TYPES.items() if site in sites]
    candidates = here if node_type == "auto" else [choose_node_type_name(site, node_type, here)]
    infos = [availability(chi, t, hours, nodes) for t in candidates]
    for info in infos:
        print(f"   {info['node_type']} at {site}: {info['nodes']} nodes, {nodes} free for {hours:g} h from "
              f"{_when(info['next_free']) if info['next_free'] else 'no time known'}", flush=True)
    known = [i for i in infos if i["next_free"] is not None]
    if at is not None:  # the first type free by then; else Blazar decides on the first candidate
        fits = [i for i in known if i["next_free"] <= at + dt.timedelta(minutes=5)]
        return (fits or infos)[0]["node_type"], at
    if not known:
        raise UserError(f"no {nodes} host(s) of {', '.join(candidates)} at {site} have a known free window of "
                        f"{hours:g} h", "try another site or node_type, fewer lease_hours, or start at a time you pick")
    first = min(known, key=lambda i: i["next_free"])
    start = first["next_free"]
    if start.second or start.microsecond:  # Blazar counts in whole minutes: the next one, not the one it is in
        start = start.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    return first["node_type"], None if start <= _utcnow() + dt.timedelta(minutes=1) else start


def choose_node_type_name(site: str, node_type: str, here: list[str]) -> str:
    """A node type the user named, refused only where it does not exist at `site`."""
    homes = (*A100_NODE_TYPES.get(node_type, ((site,), ""))[0], *ALSO_AT.get(node_type, ()))
    if site not in homes:
        raise UserError(f"{node_type} nodes are at {' and '.join(homes)}, not {site}",
                        f"set site='{homes[0]}'" + (f" or node_type to one of {', '.join(here)}" if here else ""))
    return node_type


def _not_started(record: NodeRecord) -> bool:
    return bool(record.lease_start) and dt.datetime.fromisoformat(record.lease_start) > \
        _utcnow() + dt.timedelta(minutes=1)


def _booked(record: NodeRecord, state_dir: Path) -> NodeRecord:
    """Say when a lease booked ahead starts, ends and costs, and stop: nothing boots before its start."""
    start, end = (dt.datetime.fromisoformat(t) for t in (record.lease_start, record.lease_end))
    hours, count = (end - start).total_seconds() / 3600, len(record.nodes or [None])
    record.status = "booked"
    record.write(state_dir)
    print(f"lease {record.lease_name} ({record.lease_id}) at {record.site} is BOOKED: {count}x "
          f"{record.node_type} from {_when(start)} to {_when(end)}, {su_cost(hours, count, record.node_type):g} "
          f"SU. Nothing runs or costs until then. Run this notebook again after {_when(start)} to boot the "
          f"node{'s' if count > 1 else ''}; to cancel, run 05_release_node.", flush=True)
    return record


# -- reserve ------------------------------------------------------------------------------------
def reserve(target: str = "chameleon", *, site: str | None = None, node_type: str = "auto", nodes: int = 1,
            lease_hours: float = DEFAULT_LEASE_HOURS, image: str = DEFAULT_IMAGE, lease_name: str | None = None,
            server_name: str | None = None, state_dir: str | Path | None = STATE_DIR, project: str | None = None,
            key_name: str | None = None, private_key: str | None = None, public_key: str | None = None,
            keep_on_failure: bool = False, ssh_timeout_s: float = 20 * 60, start: str = "now") -> NodeRecord | None:
    """Lease `nodes` A100 nodes of one type, boot `image` on each (servers `<server_name>-0..N-1`, by default
    `<lease_name>-0..`), give the head (node 0) a floating IP and wait for SSH there; the node record.

    `start`: "now"; "next_free", the earliest `lease_hours` window in which `nodes` matching hosts are free; or
    an ISO time (UTC unless it says otherwise). A lease that starts later is booked and this returns at once
    (record status "booked"): run it again after the start to pick the lease up and boot.

    Re-running reuses the live lease and servers of the same names. On a failure after the lease
    exists, everything made is released (or kept, with `keep_on_failure=True`, and said so plainly).
    """
    nodes = check_nodes(nodes)
    when = parse_start(start)
    if not _on_chameleon(target, "nothing to reserve, every stage runs on this machine"):
        return None
    if not 0 < lease_hours <= MAX_LEASE_HOURS:
        raise UserError(f"lease_hours={lease_hours} is outside (0, {MAX_LEASE_HOURS}]",
                        "Chameleon caps leases at 7 days; the reproduction needs a few hours, boot included")
    state_dir = _state_dir(state_dir)
    user = os.environ.get("OS_USERNAME") or os.environ.get("USER") or "user"
    lease_name = lease_name or f"nanorepro-{user}"
    ports = _ssh_ports(nodes)
    old = NodeRecord.read(state_dir)
    if old and old.status != "released" and old.lease_name not in (None, lease_name):
        raise UserError(f"{state_dir} already holds the node of lease {old.lease_name}",
                        f"release it first (`{release_command(state_dir)}`) or use another results_dir")
    started = time.monotonic()

    with _step(f"connecting to {site or os.environ.get('OS_REGION_NAME')}"):
        chi, site = connect(site, project)
    record = NodeRecord(
        site=site, project=project or os.environ.get("OS_PROJECT_NAME") or os.environ.get("OS_PROJECT_ID"),
        lease_name=lease_name, server_name=f"{server_name or lease_name}-0", image=image,
        status="reserving", user=os.environ.get("NANOREPRO_SSH_USER", "cc"), port=ports[0],
        remote_dir=os.environ.get("NANOREPRO_REMOTE_DIR", "nanorepro"),
        nodes=_node_entries(server_name or lease_name, ports, nodes),
    )

    with _step(f"looking for a live lease named {lease_name}"):
        lease = find_lease(chi, lease_name)
        print(f"   found {lease['id']} ({lease['status']}): reusing it" if lease else "   none")
    if lease:
        _note_lease(record, lease)
    if lease and lease["status"] == "ERROR":
        record.write(state_dir)
        raise UserError(f"lease {lease_name} at {site} is in ERROR from an earlier try; until released it may "
                        "still hold a node and count against the allocation",
                        f"release it (`{release_command(state_dir)}` or 05_release_node), then run this again")
    if lease and _lease_hosts(lease) not in (None, nodes):
        held = _lease_hosts(lease)
        record.nodes = _node_entries(server_name or lease_name, ports, held)  # what release() looks for
        record.write(state_dir)
        raise UserError(f"lease {lease_name} at {site} holds {_plural(held, 'node')}, not the nodes={nodes} asked "
                        f"for. The {still_running(record, state_dir)}",
                        f"set nodes={held} to use it, or release it first to lease {_plural(nodes, 'node')}")

    with _step("checking the image and the SSH key"):
        try:
            record.update(**_check_image_and_key(chi, image, key_name, private_key, public_key))
        except UserError as e:
            if lease:  # from an earlier run: say it runs, whatever went wrong now
                raise UserError(f"{e.problem}. The {still_running(record, state_dir)}", e.fix) from e
            raise

    if lease is None:
        _note_lease(record, _new_lease(chi, record, state_dir, node_type, lease_hours, keep_on_failure, nodes, when))
    record.write(state_dir)
    if _not_started(record):
        return _booked(record, state_dir)

    try:
        _boot(chi, record, state_dir, poll=_poll_s(), ssh_timeout_s=ssh_timeout_s)
        with _step("checking each node's GPUs (nvidia-smi -L), before anything is installed"):
            check_gpu_models(record, state_dir, need=EXPECTED_GPU if node_type == "auto" else None)
    except KeyboardInterrupt:
        print("\ninterrupted: " + still_running(record, state_dir), flush=True)
        raise
    except Exception as e:
        _release_after_failure(chi, record, state_dir, e, keep=keep_on_failure)

    record.status = "ready"
    record.write(state_dir)
    what = f"{record.node_type} ({record.gpus})" if nodes == 1 else \
        f"{nodes}x {record.node_type} ({record.gpus} each; the others reached through the head at " \
        f"{', '.join(str(n.private_ip) for n in record.nodes[1:])})"
    print(f"{'node' if nodes == 1 else f'{nodes} nodes'} ready in {duration(time.monotonic() - started)}: "
          f"ssh {record.user}@{record.host}"
          f"{' -p ' + str(record.port) if record.port != 22 else ''} -i {record.key_path}\n"
          f"{what} at {site}, lease {lease_name} until "
          f"{_when(dt.datetime.fromisoformat(record.lease_end))}. When done: 05_release_node "
          f"or `{release_command(state_dir)}`", flush=True)
    return record


def _node_entries(base: str, ports: list[int], count: int) -> list[NodeEntry]:
    """The record's nodes, head first, before their servers exist: names and SSH ports."""
    return [NodeEntry(name=f"{base}-{i}", ssh_port=ports[min(i, len(ports) - 1)]) for i in range(count)]


def _note_lease(record: NodeRecord, lease: dict[str, Any]) -> None:
    """The lease's id, dates, node type and GPUs, into the node record."""
    node_type = _lease_node_type(lease)
    fips = [r["id"] for r in _reservations(lease) if r.get("resource_type") == "virtual:floatingip"]
    record.update(fip_reservation_id=fips[0] if fips else None)
    record.update(lease_id=lease["id"], lease_start=_parse_blazar(lease["start_date"]).isoformat(),
                  lease_end=_parse_blazar(lease["end_date"]).isoformat(), node_type=node_type,
                  gpus=A100_NODE_TYPES.get(node_type, ((), None))[1])


def _new_lease(chi: Any, record: NodeRecord, state_dir: Path, node_type: str, hours: float,
               keep_on_failure: bool, nodes: int = 1, when: str | dt.datetime = "now") -> dict[str, Any]:
    """Choose the node type (and, for `when`="next_free", the start), say what the lease costs, and create it.
    When creating fails but Blazar made the lease all the same (its reply was lost), that lease is released (or
    kept) and the failure raised."""
    site, name = record.site, record.lease_name
    start = None  # now
    with _step(f"choosing an A100 node type at {site}"):
        if when == "now":
            node_type = choose_node_type(chi, site, node_type, hours, nodes)
        else:
            node_type, start = choose_window(chi, site, node_type, hours, nodes, None if when == "next_free" else when)
    rate, source = su_rate(node_type)
    print(f"This lease will cost {su_cost(hours, nodes, node_type):g} SU: {_plural(nodes, 'node')} x {hours:g} h x "
          f"{rate:g} SU per node-hour ({source}). Releasing early (05_release_node) stops the charge for the hours "
          "left.", flush=True)
    record.write(state_dir)  # the name is on record before Blazar hears it: release() finds it
    with _step(f"creating lease {name} for {'one' if nodes == 1 else nodes} {node_type} node"
               f"{'' if nodes == 1 else 's'}, {hours:g} h"):
        try:
            return create_lease(chi, name, node_type, hours, fip=True, nodes=nodes, start=start)
        except Exception as e:  # the reply may be lost after Blazar made it
            made, error = _lease_made_anyway(chi, name, e, state_dir), e
        except KeyboardInterrupt:
            print(f"\ninterrupted while creating lease {name}: it may exist and cost SUs; release it with "
                  f"`{release_command(state_dir)}`", flush=True)
            raise
    _note_lease(record, made)
    record.write(state_dir)
    _release_after_failure(chi, record, state_dir, error, keep_on_failure)


def _release_after_failure(chi: Any, record: NodeRecord, state_dir: Path, error: Exception,
                           keep: bool) -> NoReturn:
    """After a failure once the lease exists: release everything (or keep it, saying so), then raise
    the failure with what is left running, if anything."""
    problem = error.problem if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    fix = error.fix if isinstance(error, UserError) else "read the message above"
    if keep:
        raise UserError(f"{problem}. The {still_running(record, state_dir)}", fix) from error
    print(f"{problem}\nreleasing what this reservation made, so it does not keep costing SUs", flush=True)
    try:
        left = _release(chi, record, poll=_poll_s(), timeout_s=RELEASE_TIMEOUT_S)
    except Exception as e2:
        raise UserError(f"{problem}; releasing failed too ({type(e2).__name__}: {e2}). The "
                        f"{still_running(record, state_dir)}", fix) from error
    if left:
        raise UserError(f"{problem}; after releasing, still left at {record.site}: "
                        f"{', '.join(what for what, _ in left)}. The {still_running(record, state_dir)}",
                        f"{fix}; remove what is left: {'; '.join(f'`{command}`' for _, command in left)}") from error
    record.status = "released"
    record.write(state_dir)
    raise UserError(f"{problem}. The lease, server{'s' if len(record.nodes or []) > 1 else ''} and floating "
                    "IP were released: nothing is left running",
                    f"{fix}; then run this notebook again") from error


def _lease_made_anyway(chi: Any, name: str, error: BaseException, state_dir: Path) -> dict[str, Any]:
    """After a failed create: the lease Blazar made all the same (its reply was lost), or raise saying
    that none was made (or that it cannot be known, and how to release it)."""
    try:
        made = find_lease(chi, name)
    except Exception as e:
        raise UserError(f"creating lease {name} failed ({type(error).__name__}: {error}) and listing leases failed "
                        f"too ({type(e).__name__}: {e}): a lease of that name may exist",
                        f"when the site answers again run `{release_command(state_dir)}`") from error
    if made is None:
        if isinstance(error, UserError):
            raise error
        raise UserError(f"creating lease {name} failed ({type(error).__name__}: {error}); no lease was made",
                        "check this machine reaches Chameleon, then run this again") from error
    print(f"   creating lease {name} failed ({type(error).__name__}) but Blazar made it ({made['id']})", flush=True)
    return made


def _boot(chi: Any, record: NodeRecord, state_dir: Path, *, poll: float, ssh_timeout_s: float) -> None:
    """Everything after the lease exists: ACTIVE, a server per node, the head's floating IP, SSH on the head
    (the other nodes have no public address: the head reaches them)."""
    with _step(f"waiting for lease {record.lease_name} to become ACTIVE"):
        lease = wait_lease(chi, record.lease_id, LEASE_TIMEOUT_S, poll)
    record.reservation_id = _node_reservation(lease)["id"]
    record.write(state_dir)

    nodes = record.nodes
    for node in nodes:  # all submitted before any is waited for: they build side by side
        with _step(f"launching server {node.name} with {record.image}"):
            node.server_id = launch_server(chi, record, NETWORK, poll, SERVER_TIMEOUT_S, name=node.name)
            record.server_id = nodes[0].server_id
            record.write(state_dir)
    servers = "servers" if len(nodes) > 1 else "server"
    with _step(f"waiting for the {servers} to build (bare-metal A100 nodes take 10-30 min)"):
        for node in nodes:
            wait_server(chi, node.server_id, node.name, SERVER_TIMEOUT_S, poll)
            node.private_ip = private_ip(chi, node.server_id)
            if node.private_ip is None and len(nodes) > 1:
                raise UserError(f"server {node.name} has no address on {NETWORK}",
                                "the nodes reach each other over it: reserve again")
        record.write(state_dir)

    with _step("attaching a floating IP"):
        attach_floating_ip(chi, record, state_dir)
    with _step(f"waiting for SSH on {record.host}:{record.port}"):
        wait_for_ssh(record.host, record.port, ssh_timeout_s, poll)


def check_gpu_models(record: NodeRecord, state_dir: Path, need: str | None) -> None:
    """Every node's GPUs as `nvidia-smi -L` lists them, into the record (the node entries' "gpu_models",
    the record's "gpu_model"). A node without an NVIDIA GPU is refused; with `need` (node_type="auto": the
    presets' A100), so is a node whose GPUs are another model. A user's own node_type runs with what it has."""
    runner = SSHRunner.from_state(state_dir, workdir=state_dir)
    try:
        listings = on_each(runner.nodes, lambda i, node: node.ssh.exec("nvidia-smi -L", timeout=60))
    finally:
        runner.close()
    bad = []
    for i, (entry, result) in enumerate(zip(record.nodes, listings)):
        if isinstance(result, BaseException):
            raise result
        code, out = result
        models = nodeinstall.gpu_models(out)
        entry.gpu_models = models
        where = f"node {i} ({entry.name}, server {entry.server_id})"
        if code != 0 or not models:
            bad.append(f"{where} shows no NVIDIA GPU (nvidia-smi -L: {out.strip()[:120] or f'exit {code}'})")
        elif need and not all(need in m for m in models):
            bad.append(f"{where} has {', '.join(sorted(set(models)))}, not an {need}")
    record.gpu_model = (record.nodes[0].gpu_models or [None])[0]
    record.write(state_dir)
    if bad:
        types = ", ".join(t for t, (sites, _) in A100_NODE_TYPES.items() if record.site in sites)
        raise UserError("; ".join(bad), f"reserve again (a new lease may get another host), or name a node type "
                        f"whose hosts all have an {EXPECTED_GPU}: node_type one of {types or 'none at this site'}")
    models = sorted({m for entry in record.nodes for m in entry.gpu_models})
    found = ", ".join(f"{len(e.gpu_models)}x {e.gpu_models[0]}" for e in record.nodes)
    other = "" if all(EXPECTED_GPU in m for m in models) else \
        f": not an {EXPECTED_GPU}, the published figures were measured on one (the report says so)"
    print(f"   {found}{other}", flush=True)


def _check_image_and_key(chi: Any, image: str, key_name: str | None, private_key: str | None,
                         public_key: str | None) -> dict[str, str]:
    """Fail before any lease exists: the image must exist, the key must be usable and in Nova; the
    record's key_name and key_path."""
    from chi.exception import CHIValueError, ResourceError

    try:
        chi.image.get_image(image)
    except (CHIValueError, ResourceError) as e:
        raise UserError(f"image {image!r}: {e}", f"use image={DEFAULT_IMAGE!r}") from e
    key_name = key_name or os.environ.get("OS_KEYPAIR_NAME") or chi.context.get("keypair_name")
    private_key = private_key or os.environ.get("OS_KEYPAIR_PRIVATE_KEY")
    public_key = public_key or os.environ.get("OS_KEYPAIR_PUBLIC_KEY")
    if not key_name:
        raise UserError("no SSH keypair name", "set OS_KEYPAIR_NAME or pass key_name=")
    if not private_key or not Path(private_key).expanduser().is_file():
        raise UserError(f"no SSH private key file ({private_key or 'none given'})",
                        "on the hub OS_KEYPAIR_PRIVATE_KEY is set for you; elsewhere pass private_key= "
                        "and public_key= (e.g. ~/.ssh/id_ed25519 and ~/.ssh/id_ed25519.pub)")
    key_path = check_key_file(private_key)  # before any lease: ssh would refuse a key others can read
    pub = Path(public_key).expanduser() if public_key else None
    if pub and pub.is_file():
        chi.server.update_keypair(key_name, pub.read_text().strip())  # creates it in Nova, or replaces a stale copy
    elif chi.server.get_keypair(key_name).public_key is None:
        raise UserError(f"keypair {key_name!r} is not in Nova and there is no public key to create it",
                        "pass public_key= (the .pub file of private_key)")
    return {"key_name": key_name, "key_path": str(key_path.resolve())}


def find_lease(chi: Any, name: str) -> dict[str, Any] | None:
    """The live lease called `name` in this project, if any (TERMINATED, TERMINATING and DELETING ones are
    ignored: they make python-chi's idempotent lookup fail, and cannot be used again)."""
    live = [lease for lease in chi.blazar().lease.list() if lease["name"] == name and lease["status"] in REUSABLE]
    if len(live) > 1:
        raise UserError(f"{len(live)} live leases are named {name}",
                        "release the extra ones in the Chameleon GUI (Reservations > Leases), or pick another name")
    return live[0] if live else None


def create_lease(chi: Any, name: str, node_type: str, hours: float, fip: bool = False,
                 nodes: int = 1, start: dt.datetime | None = None) -> dict[str, Any]:
    """Ask Blazar for `nodes` `node_type` hosts (min = max = nodes) from now for `hours` (with `fip`, and one
    floating IP reserved with it, for the head,
    so that it cannot run out after the boot; a site that refuses that gets the lease without one). Blazar's
    refusal becomes a UserError (`Lease.submit()` would reduce it to "Unable to make lease")."""
    from blazarclient.exception import BlazarClientException

    if start is None:
        lease = chi.lease.Lease(name, duration=dt.timedelta(hours=hours))  # counts from now, whatever start_date says
    else:  # Blazar's minutes, UTC
        lease = chi.lease.Lease(name, start_date=start.astimezone(dt.timezone.utc).replace(tzinfo=None),
                                end_date=(start + dt.timedelta(hours=hours)).astimezone(dt.timezone.utc).replace(tzinfo=None))
    lease.add_node_reservation(amount=nodes, node_type=node_type)
    if fip:
        lease.add_fip_reservation(1)
    try:
        return chi.blazar().lease.create(name=name, start=lease.start_date, end=lease.end_date,
                                         reservations=lease.node_reservations + (lease.fip_reservations if fip else []),
                                         events=[])
    except BlazarClientException as e:
        low = str(e).lower()
        if fip and ("floatingip" in low or "floating ip" in low):
            print(f"   the site cannot reserve a floating IP in the lease ({e}); asking without one: the node will "
                  "get one from the on-demand pool", flush=True)
            return create_lease(chi, name, node_type, hours, nodes=nodes, start=start)
        if "not enough" in low:
            fix = (f"{'no node is' if nodes == 1 else f'fewer than {nodes} nodes are'} free for the whole lease: "
                   f"ask for fewer lease_hours{'' if nodes == 1 else ' or nodes'}, another node_type or site, or later")
        elif any(word in low for word in ("allocation", " su", "balance", "charge")):
            fix = (f"the project's allocation cannot cover {su_cost(hours, nodes, node_type):g} SU: ask its PI to renew or "
                   "recharge it")
        else:
            fix = "check the project's allocation is active and, outside the hub, that the application credential " \
                  "was created 'unrestricted'"
        raise UserError(f"Chameleon refused the lease: {e}", fix) from e


def _reservations(lease: dict[str, Any]) -> list[dict[str, Any]]:
    res = lease.get("reservations", [])
    return json.loads(res) if isinstance(res, str) else res  # Blazar sometimes nests it as JSON text


def _node_reservation(lease: dict[str, Any]) -> dict[str, Any]:
    for res in _reservations(lease):
        if res.get("resource_type") == "physical:host":
            return res
    raise UserError(f"lease {lease.get('name')} has no node reservation", "release it and reserve again")


def _lease_hosts(lease: dict[str, Any]) -> int | None:
    """How many hosts the lease's node reservation holds (None when Blazar does not say)."""
    res = next((r for r in _reservations(lease) if r.get("resource_type") == "physical:host"), {})
    count = res.get("max", res.get("min"))
    return int(count) if count is not None else None


def _lease_node_type(lease: dict[str, Any]) -> str | None:
    props = " ".join(str(res.get("resource_properties", "")) for res in _reservations(lease))
    return next((t for t in A100_NODE_TYPES if t in props), None)


def wait_lease(chi: Any, lease_id: str, timeout_s: float, poll: float) -> dict[str, Any]:
    """Poll until ACTIVE; ERROR (which python-chi's wait returns on) and time-outs are errors."""
    def active(lease: dict[str, Any]) -> bool:
        if lease["status"] in ("ERROR", "TERMINATED", "TERMINATING", "DELETING", "DELETED"):
            raise UserError(f"lease {lease['name']} went to {lease['status']} instead of ACTIVE",
                            "the site could not start it (often a node failed its checks): reserve again, "
                            "or try another node_type or site")
        return lease["status"] == "ACTIVE"

    lease, ok = poll_until(lambda: chi.blazar().lease.get(lease_id), active, timeout_s, poll)
    if not ok:
        raise UserError(f"lease {lease['name']} is still {lease['status']} after {duration(timeout_s)}",
                        "the site is slow to start leases: run this notebook again later (it reuses the lease)")
    return lease


def launch_server(chi: Any, record: NodeRecord, network: str, poll: float, timeout_s: float,
                  name: str | None = None) -> str:
    """Create the server `name` (default the record's server_name) on the reservation (or find the one of
    that name); its id."""
    name = name or record.server_name
    existing = chi.server.get_server_id(name)
    if existing:
        status = chi.nova().servers.get(existing).status
        if status != "ERROR":
            print(f"   found server {name} ({existing}, {status}): reusing it")
            return existing
        print(f"   server {name} is in ERROR from an earlier try: deleting it and building again")
        chi.server.delete_server(existing)
        _wait_gone(lambda: _server_exists(chi, existing), timeout_s, poll)
    try:  # Server() calls Glance and Nova; show="widget" raises outside IPython after creating the server
        server = chi.server.Server(name, reservation_id=record.reservation_id, image_name=record.image,
                                   key_name=record.key_name, network_name=network)
        server.submit(wait_for_active=False, show=None, idempotent=True)
    except Exception as e:
        raise UserError(f"Nova refused to create server {name}: {e}",
                        "check the image and network exist at this site and the lease is ACTIVE") from e
    server_id = chi.server.get_server_id(name)  # the object submit() created carries no id
    if not server_id:
        raise UserError(f"server {name} was requested but Nova does not list it", "run this notebook again")
    return server_id


def _server_exists(chi: Any, server_id: str) -> bool:
    from novaclient.exceptions import NotFound

    try:
        return chi.nova().servers.get(server_id).status != "DELETED"
    except NotFound:
        return False


def private_ip(chi: Any, server_id: str) -> str | None:
    """The server's fixed address on the shared network (what the other nodes reach it at)."""
    addresses = chi.nova().servers.get(server_id).addresses
    fixed = [a["addr"] for net in (NETWORK, *addresses) for a in addresses.get(net, [])
             if a.get("OS-EXT-IPS:type", "fixed") == "fixed"]
    return fixed[0] if fixed else None


def wait_server(chi: Any, server_id: str, name: str, timeout_s: float, poll: float) -> None:
    """Poll until the server is ACTIVE; ERROR (with Nova's fault) and time-outs are errors."""
    def active(server: Any) -> bool:
        if server.status == "ERROR":
            fault = (getattr(server, "fault", None) or {}).get("message", "no reason given")
            raise UserError(f"server {name} failed to build: {fault}",
                            "bare-metal builds sometimes fail on a bad node: reserve again (a new lease may get "
                            "another node)")
        return server.status == "ACTIVE"

    server, ok = poll_until(lambda: chi.nova().servers.get(server_id), active, timeout_s, poll)
    if not ok:
        raise UserError(f"server {name} is still {server.status} after {duration(timeout_s)}",
                        "run this notebook again to keep waiting (it reuses the lease and server)")


def attach_floating_ip(chi: Any, record: NodeRecord, state_dir: Path) -> None:
    """Give the server a public address: the one it has, the one recorded, or a new one."""
    server = chi.nova().servers.get(record.server_id)
    attached = [a["addr"] for addrs in server.addresses.values() for a in addrs
                if a.get("OS-EXT-IPS:type") == "floating"]
    if attached:
        fip = next((f for f in chi.network.list_floating_ips() if f["floating_ip_address"] == attached[0]), {})
        record.update(floating_ip=attached[0], floating_ip_id=fip.get("id", record.floating_ip_id))
        print(f"   already has {attached[0]}")
    else:
        fips = chi.network.list_floating_ips()
        fip = next((f for f in fips if f["id"] == record.floating_ip_id and not f.get("port_id")), None)
        tag = f"reservation:{record.fip_reservation_id}"
        if fip is None and record.fip_reservation_id:  # the one reserved in the lease
            fip = next((f for f in fips if tag in (f.get("tags") or []) and not f.get("port_id")), None)
            if fip is None:
                print("   the lease's reserved floating IP is not there: taking one from the on-demand pool")
        if fip is None:
            public = chi.network.get_network_id(chi.network.PUBLIC_NETWORK)
            try:
                fip = chi.neutron().create_floatingip(
                    {"floatingip": {"floating_network_id": public,
                                    "description": f"nanorepro {record.server_name}"}})["floatingip"]
            except Exception as e:  # neutronclient's 409 "No more IP addresses available"
                raise UserError(f"no floating IP could be had from {record.site}'s public pool "
                                f"({type(e).__name__}: {e})",
                                "the pool runs dry at busy times: reserve again later (a new lease reserves its "
                                "address where the site supports it)") from e
        record.update(floating_ip=fip["floating_ip_address"], floating_ip_id=fip["id"])
        record.write(state_dir)  # recorded before it is bound, so a crash cannot leak it
        chi.server.associate_floating_ip(record.server_id, fip["floating_ip_address"])
        print(f"   {fip['floating_ip_address']}")
    if record.host != record.floating_ip:
        (Path(state_dir) / KNOWN_HOSTS).unlink(missing_ok=True)  # a new address or node: a new host key
    record.host = record.floating_ip
    record.write(state_dir)


def wait_for_ssh(host: str, port: int, timeout_s: float, poll: float) -> None:
    """Until something on host:port speaks SSH (python-chi's check_connectivity returns None)."""
    def knock() -> str | None:
        """None when an SSH server answers, else what happened instead."""
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.settimeout(5)
                return None if sock.recv(64).startswith(b"SSH-") else "not an SSH server"
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    last, ok = poll_until(knock, lambda said: said is None, timeout_s, poll)
    if not ok:
        raise UserError(f"the node at {host} does not answer SSH on port {port} after {duration(timeout_s)} ({last})",
                        "it may still be booting: run this notebook again to keep waiting (it reuses the lease and "
                        "server). On bare metal the image's own firewall decides, not security groups: Chameleon's "
                        "CC images let SSH in, a custom image must too")


def _wait_gone(exists: Callable[[], bool], timeout_s: float, poll: float) -> None:
    """Poll until exists() is false or the time is up (the caller then checks what is left)."""
    poll_until(exists, lambda there: not there, timeout_s, poll)

# -- release ------------------------------------------------------------------------------------
def release(target: str = "chameleon", *, state_dir: str | Path | None = STATE_DIR, site: str | None = None,
            lease_name: str | None = None, server_name: str | None = None,
            project: str | None = None) -> NodeRecord | None:
    """Delete every server, the floating IP and the lease recorded in `state_dir` (or named: `lease_name`, and
    `server_name` or `<lease_name>-<i>` for the servers), then check that none of them is left."""
    if not _on_chameleon(target, "nothing was reserved, nothing to release"):
        return None
    state_dir = _state_dir(state_dir)
    record = NodeRecord.read(state_dir) or NodeRecord()
    if record.status == "released" and not lease_name:
        print(f"the node recorded in {state_dir} was already released ({record.updated}); nothing to do")
        return record
    record.update(**{k: v for k, v in dict(lease_name=lease_name, server_name=server_name, site=site).items() if v})
    if not record.lease_name and not record.server_name:
        print(f"no node recorded in {state_dir / NODE_FILE}: nothing to release "
              "(pass lease_name= and site= to release a lease by name)")
        return None
    started = time.monotonic()
    with _step(f"connecting to {record.site or os.environ.get('OS_REGION_NAME')}"):
        chi, record.site = connect(record.site, project or record.project)
    try:
        left = _release(chi, record, poll=_poll_s(), timeout_s=RELEASE_TIMEOUT_S)
    except Exception as e:
        raise UserError(f"releasing failed ({type(e).__name__}: {e}). The {still_running(record, state_dir)}",
                        f"retry `{release_command(state_dir)}`; if it keeps failing delete the lease in the "
                        f"Chameleon GUI ({record.site}: Reservations > Leases)") from e
    if left:
        raise UserError(f"still left at {record.site} after {duration(RELEASE_TIMEOUT_S)}: "
                        f"{', '.join(what for what, _ in left)}",
                        f"retry `{release_command(state_dir)}` in a few minutes, or remove them: "
                        f"{'; '.join(f'`{command}`' for _, command in left)} (or in the Chameleon GUI)")
    record.status = "released"
    if state_dir.is_dir():
        record.write(state_dir)
    print(f"released in {duration(time.monotonic() - started)}, and checked: no server, floating IP or lease of "
          f"{record.lease_name} is left at {record.site}", flush=True)
    return record


def _server_matcher(record: NodeRecord) -> Callable[[Any], bool]:
    """Whether a Nova server is one of the record's: by id, by name, or named `<lease>-<i>` / `<server_name>-<i>`
    (a crash may come before an id is recorded; a release by name has no record)."""
    nodes = record.nodes or []
    ids = {n.server_id for n in nodes} | {record.server_id}
    names = {n.name for n in nodes} | {record.server_name}
    bases = [re.escape(b) for b in (record.lease_name, record.server_name) if b]
    numbered = re.compile(rf"(?:{'|'.join(bases)})-\d+") if bases else None
    return lambda s: s.id in ids - {None} or s.name in names - {None} or bool(numbered and numbered.fullmatch(s.name))


def _release(chi: Any, record: NodeRecord, *, poll: float, timeout_s: float) -> list[tuple[str, str]]:
    """Delete what the record names (and what carries its names); what is still left afterwards, each with
    the command that removes it."""
    from blazarclient.exception import BlazarClientException
    from chi.exception import CHIValueError
    from novaclient.exceptions import NotFound

    lease_name, ours = record.lease_name, _server_matcher(record)
    servers = {s.id: s for s in chi.nova().servers.list() if ours(s)}
    addresses = {a["addr"] for s in servers.values() for addrs in s.addresses.values() for a in addrs
                 if a.get("OS-EXT-IPS:type") == "floating"}
    if record.floating_ip:
        addresses.add(record.floating_ip)
    # an address reserved in the lease goes back with the lease: not deallocated here
    addresses -= {f["floating_ip_address"] for f in chi.network.list_floating_ips() if "blazar" in (f.get("tags") or [])}
    leases = {lease["id"]: lease["status"] for lease in chi.blazar().lease.list()
              if (lease["name"] == lease_name and lease["status"] in LIVE) or lease["id"] == record.lease_id}

    names = ", ".join(sorted(s.name for s in servers.values()))
    with _step(f"deleting server{'s' if len(servers) > 1 else ''} {names}" if servers else "no server to delete"):
        for server_id in servers:
            with contextlib.suppress(NotFound):
                chi.server.delete_server(server_id)
        _wait_gone(lambda: any(_server_exists(chi, i) for i in servers), timeout_s, poll)
    with _step(f"releasing floating IP {', '.join(sorted(addresses))}" if addresses else "no floating IP to release"):
        for address in addresses:
            with contextlib.suppress(CHIValueError):  # already gone
                chi.network.deallocate_floating_ip(address)  # not Server.delete(delete_ips=True): wrong path
    with _step(f"deleting lease {lease_name}" if leases else "no lease to delete"):
        for lease_id, status in leases.items():
            if status in ("TERMINATING", "DELETING", "TERMINATED", "DELETED"):
                continue  # already on its way out: waited for below
            try:
                chi.blazar().lease.delete(lease_id)
            except BlazarClientException as e:
                if getattr(e, "kwargs", {}).get("code", getattr(e, "code", None)) != 404:
                    raise
        _wait_gone(lambda: any(lease["id"] in leases and lease["status"] not in ("TERMINATED", "DELETED")
                               for lease in chi.blazar().lease.list()), timeout_s, poll)

    with _step("checking nothing is left"):
        left = [(f"server {s.name} ({s.id})", f"openstack server delete {s.id}") for s in chi.nova().servers.list()
                if (s.id in servers or ours(s)) and s.status != "DELETED"]
        reserved = f"reservation:{record.fip_reservation_id}"
        left += [(f"floating IP {f['floating_ip_address']}", f"openstack floating ip delete {f['id']}")
                 for f in chi.network.list_floating_ips()
                 if f["floating_ip_address"] in addresses or reserved in (f.get("tags") or [])]
        left += [(f"lease {lease['name']} ({lease['id']}, {lease['status']})",
                  f"openstack reservation lease delete {lease['id']}") for lease in chi.blazar().lease.list()
                 if (lease["id"] in leases or lease["name"] == lease_name) and lease["status"] in LIVE]
        print(f"   nothing left: no server ({len(servers)} deleted), floating IP or lease" if not left
              else f"   left: {', '.join(what for what, _ in left)}")
    return left


def node_folder(i: int) -> str:
    """Where node i's nvidia-smi report and environment are kept in the state folder: node/ for the head
    (as for a single node), node-<i>/ for the others."""
    return "node" if i == 0 else f"node-{i}"


def setup_node(target: str = "chameleon", state_dir: str | Path | None = STATE_DIR) -> Path | None:
    """Install nanorepro on the reserved node, or on every node of the lease at once (one thread and one
    SSH connection each; nodeinstall: a Python pyproject accepts, compiler and headers, torch built for
    the driver's CUDA and checked on every GPU), and record each node's GPUs and software into
    `<state_dir>/node/` (the head) and `node-<i>/` (node i), and how its install went into its entry of
    the record's "nodes" ("setup": status, torch, GPUs, when; a record without "nodes" keeps only the
    folder). On several nodes, then their private network (network.prepare: each node's firewall admits
    it, the head's rendezvous port answers every node), each node's interface and firewall noted in its
    entry ("network"). A failure names the node(s) it happened on and says that the lease still runs,
    until when, and how to release it. Returns the head's folder."""
    if not _on_chameleon(target, "nothing to install, stages use this environment"):
        return None
    state_dir = _state_dir(state_dir)
    record = NodeRecord.read(state_dir) or NodeRecord()
    if record.status == "booked" and _not_started(record):
        print(f"lease {record.lease_name} is booked from "
              f"{_when(dt.datetime.fromisoformat(record.lease_start))}: nothing to install until it starts "
              "(run 00 again then)", flush=True)
        return None
    runner = SSHRunner.from_state(state_dir, workdir=state_dir)
    nodes = runner.nodes
    if len(nodes) > 1:  # the nodes install at once: each line says whose it is
        for i, node in enumerate(nodes):
            node.say = lambda s, i=i: print(f"[node {i}] {s}", flush=True)
    where = runner.host if len(nodes) == 1 else f"{len(nodes)} nodes in parallel"
    try:
        with _step(f"installing nanorepro on {where} (a venv with torch for the node's CUDA driver: about 5 min), "
                   "then recording each node's nvidia-smi report and environment"):
            results = on_each(nodes, lambda i, node: _install(node, record.image, node_folder(i), state_dir))
        net: list[dict[str, Any]] | UserError | None = None
        if len(nodes) > 1 and not any(isinstance(r, BaseException) for r in results):
            with _step("admitting the lease's private network in each node's firewall, then checking that the "
                       "head's rendezvous port answers every node"):
                try:
                    net = prepare_network(runner)
                except UserError as e:
                    net = e
    finally:
        runner.close()
    _note_setup(state_dir, results, net)
    failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if not failed and isinstance(net, UserError):
        raise UserError(f"{net.problem}. The {still_running(record, state_dir)}", net.fix) from net
    if not failed:
        return state_dir / node_folder(0)
    errors = [e if isinstance(e, UserError) else UserError(f"{type(e).__name__}: {e}", "retry setup_node") for _, e in failed]
    if len(nodes) == 1:
        problem = errors[0].problem
    else:
        problem = "setup failed on " + "; on ".join(f"{runner.label(i)}: {e.problem}" for (i, _), e in zip(failed, errors))
        if len(failed) < len(nodes):
            problem += f" (the other node{'s' if len(nodes) - len(failed) > 1 else ''} installed fine)"
    raise UserError(f"{problem}. The {still_running(record, state_dir)}", errors[0].fix) from failed[0][1]


def _install(node: SSHRunner, image: str | None, folder: str, state_dir: Path) -> dict[str, Any] | None:
    """One node's setup (in its own thread): install, then its nvidia-smi report and environment fetched
    into `<state_dir>/<folder>/`; the GPU check's report (None with an install command of one's own)."""
    report = node.setup(image=image)
    node.record_node(folder)
    node.fetch(folder, state_dir)
    return report


def _note_setup(state_dir: Path, results: list[Any], net: list[dict[str, Any]] | UserError | None = None) -> None:
    """Each node's install result into its entry of the record's "nodes" (when the record has them), and
    its network's (network.prepare's facts, or its failure; none when it was not prepared)."""
    record = NodeRecord.read(state_dir)
    entries = record.nodes if record else []
    if not entries:
        return
    at = _utcnow().isoformat(timespec="seconds")
    for i, (entry, result) in enumerate(zip(entries, results)):
        if isinstance(result, BaseException):
            problem = result.problem if isinstance(result, UserError) else f"{type(result).__name__}: {result}"
            entry.setup = {"status": "failed", "error": problem, "at": at}
        else:
            entry.setup = {"status": "ready", "folder": node_folder(i), "at": at,
                           "torch": (result or {}).get("torch"), "gpus": len((result or {}).get("devices", [])) or None}
        entry.network = None  # an earlier setup's facts may no longer hold
        if isinstance(net, UserError):
            entry.network = {"status": "failed", "error": net.problem, "at": at}
        elif net is not None:
            entry.network = {**net[i], "status": "ready", "at": at}
    record.write(state_dir)
