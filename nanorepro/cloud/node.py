"""The node record: what a reservation leased and booted, kept as JSON in the results folder.

`chameleon.reserve` fills it in step by step and writes it after each step (atomically: after a crash it
is what `release` trusts to find the lease, servers and floating IP); `SSHRunner.from_state` reads it to
reach the nodes; `chameleon.setup_node` adds each node's install and network facts. This module is the
only place the file is read or written: every other module sees the dataclasses below.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from nanorepro.errors import UserError
from nanorepro.files import write_text_atomic

NODE_FILE = "chameleon_node.json"


@dataclasses.dataclass
class NodeEntry:
    """One node of the lease (node 0 is the head, the only one with a public address)."""

    name: str
    ssh_port: int = 22
    server_id: str | None = None
    private_ip: str | None = None  # on the lease's private network, where the other nodes reach it
    gpu_models: list[str] = dataclasses.field(default_factory=list)  # as `nvidia-smi -L` lists them
    setup: dict[str, Any] | None = None  # how its install went: status, folder, torch, GPUs, when
    network: dict[str, Any] | None = None  # its private interface and firewall, once setup prepared them

    @property
    def iface(self) -> str | None:
        """The interface holding private_ip, once setup found it (what NCCL and gloo must use)."""
        return (self.network or {}).get("iface")


@dataclasses.dataclass
class NodeRecord:
    """The lease, its servers and how to reach them. Fields stay None until the step that learns them."""

    status: str = "reserving"  # reserving, booked, ready, released
    site: str | None = None
    project: str | None = None
    lease_name: str | None = None
    lease_id: str | None = None
    lease_start: str | None = None  # ISO times, UTC
    lease_end: str | None = None
    reservation_id: str | None = None  # the lease's host reservation, which servers are launched on
    fip_reservation_id: str | None = None  # the lease's floating-IP reservation
    node_type: str | None = None
    gpus: str | None = None  # what the node type has, e.g. "4x A100 80GB"
    gpu_model: str | None = None  # what node 0 showed
    image: str | None = None
    key_name: str | None = None
    key_path: str | None = None  # the private key's path on this machine (never its content)
    server_name: str | None = None  # node 0's server
    server_id: str | None = None
    floating_ip: str | None = None
    floating_ip_id: str | None = None
    host: str | None = None  # where SSH reaches the head: its floating IP
    port: int = 22
    user: str = "cc"
    remote_dir: str = "nanorepro"
    rdzv_port: int | None = None  # torchrun's rendezvous port on the head, when not the default
    nodes: list[NodeEntry] = dataclasses.field(default_factory=list)
    updated: str | None = None

    @classmethod
    def read(cls, state_dir: str | Path) -> NodeRecord | None:
        """The record in `state_dir`, or None when there is none."""
        path = Path(state_dir) / NODE_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(raw)
        except (ValueError, TypeError, AttributeError) as e:
            raise UserError(f"the node record {path} cannot be read ({e})",
                            "release the lease in the Chameleon GUI (Reservations > Leases), then delete the file "
                            "and reserve again") from e

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NodeRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        entry_names = {f.name for f in dataclasses.fields(NodeEntry)}
        nodes = []
        for entry in raw.get("nodes") or []:
            extra = sorted(set(entry) - entry_names)
            if extra:
                raise ValueError(f"unknown node fields {extra}")
            nodes.append(NodeEntry(**entry))
        return cls(**{**raw, "nodes": nodes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, state_dir: str | Path) -> None:
        """Write the record atomically, stamped with the time."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.updated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_text_atomic(state_dir / NODE_FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    def update(self, **fields: Any) -> None:
        """Set several fields at once; a name that is not a field is a bug, not a new key."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise TypeError(f"NodeRecord has no fields {unknown}")
        for name, value in fields.items():
            setattr(self, name, value)

    @property
    def entries(self) -> list[NodeEntry]:
        """The nodes, head first; a record without "nodes" (one node, from before leases of several) as one."""
        return self.nodes or [NodeEntry(name=self.server_name or self.host or "node")]
